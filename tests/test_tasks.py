"""Tests of the synthetic tasks (rcd_ext.tasks): determinism, held-out split, verifiers, text."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

pytest.importorskip("transformers")

from rcd_ext.models import build_tiny_tokenizer  # noqa: E402
from rcd_ext.tasks import (  # noqa: E402
    BranchingWalk,
    CoupledChoices,
    PointerChasing,
    SwitchingChase,
    Task,
    get_task,
    task_names,
)

TASK_SETTINGS = [
    ("pointer_chasing", {}),
    ("pointer_chasing", {"num_symbols": 6, "hops": 3}),
    ("branching_walk", {}),
    ("coupled_choices", {}),
    ("coupled_choices", {"num_symbols": 5, "num_rows": 3, "length": 5}),
    ("coupled_choices", {"alphabet": "shared"}),
    ("branching_walk", {"num_symbols": 6, "out_degree": 3, "walk_length": 4}),
    ("switching_chase", {}),
    ("switching_chase", {"num_symbols": 4, "hops": 5}),
]


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def prompt_keys(prompts: torch.Tensor) -> set[tuple[int, ...]]:
    return set(map(tuple, prompts.tolist()))


# --- independent reference solutions, written from the task descriptions ---------------------
def chase_text(prompt: str, hops: int) -> list[str]:
    tokens = prompt.split()
    function, current = tokens[:-1], tokens[-1]
    answer = []
    for _ in range(hops):
        current = function[int(current)]
        answer.append(current)
    return answer


def walks_text(prompt: str, num_symbols: int, degree: int, length: int) -> set[tuple[str, ...]]:
    tokens = prompt.split()
    successors = {str(n): tokens[n * degree : (n + 1) * degree] for n in range(num_symbols)}
    walks = [(next_node,) for next_node in successors[tokens[-1]]]
    for _ in range(length - 1):
        walks = [walk + (node,) for walk in walks for node in successors[walk[-1]]]
    return set(walks)


def row_paths_text(prompt: str, rows: int, length: int) -> set[tuple[str, ...]]:
    """Answers made of row r_j's symbol at column j whose adjacent pairs share a row."""
    table = [prompt.split()[r * length : (r + 1) * length] for r in range(rows)]
    valid = set()
    for choice in itertools.product(range(rows), repeat=length):
        answer = tuple(table[r][j] for j, r in enumerate(choice))
        pairs_ok = all(
            any(table[r][j] == answer[j] and table[r][j + 1] == answer[j + 1] for r in range(rows))
            for j in range(length - 1)
        )
        if pairs_ok:
            valid.add(answer)
    return valid


# --- registry -------------------------------------------------------------------------------
def test_registry() -> None:
    assert {"pointer_chasing", "branching_walk", "coupled_choices",
            "switching_chase"} <= set(task_names())
    assert isinstance(get_task("pointer_chasing", hops=3), PointerChasing)
    assert get_task("branching_walk", walk_length=4).answer_length == 4
    with pytest.raises(ValueError, match="unknown task"):
        get_task("no_such_task")
    with pytest.raises(ValueError, match="hops"):
        get_task("pointer_chasing", hops=0)
    with pytest.raises(ValueError, match="junction_probability"):
        get_task("coupled_choices", junction_probability=1.0)
    with pytest.raises(ValueError, match="out_degree"):
        get_task("branching_walk", num_symbols=3, out_degree=4)


# --- determinism and split ------------------------------------------------------------------
@pytest.mark.parametrize("name, settings", TASK_SETTINGS)
def test_sampling_is_seeded_and_shaped(name: str, settings: dict) -> None:
    task = get_task(name, **settings)
    prompts, answers = task.sample_train(64, generator(0))
    assert prompts.shape == (64, task.prompt_length) and prompts.dtype == torch.long
    assert answers.shape == (64, task.answer_length) and answers.dtype == torch.long
    again = task.sample_train(64, generator(0))
    assert torch.equal(prompts, again[0]) and torch.equal(answers, again[1])
    other = task.sample_train(64, generator(1))
    assert not torch.equal(prompts, other[0])
    assert task.score(answers, prompts) == 1.0
    assert set(prompts.unique().tolist()) <= set(task.symbol_ids.tolist())


@pytest.mark.parametrize("name, settings", TASK_SETTINGS)
def test_test_set_is_deterministic_distinct_and_held_out(name: str, settings: dict) -> None:
    task = get_task(name, **settings)
    test = task.test_set(200, seed=0)
    assert len(test) == 200
    assert [(p.tolist(), a.tolist()) for p, a in test] == [
        (p.tolist(), a.tolist()) for p, a in task.test_set(200, seed=0)
    ]
    assert [p.tolist() for p, _ in test] != [p.tolist() for p, _ in task.test_set(200, seed=1)]
    test_prompts = torch.stack([p for p, _ in test])
    assert len(prompt_keys(test_prompts)) == 200
    assert task.in_test_split(test_prompts).all()
    assert task.score(torch.stack([a for _, a in test]), test_prompts) == 1.0
    # Training never produces a held-out prompt, whatever the seed.
    train_prompts = torch.cat([task.sample_train(2000, generator(seed))[0] for seed in range(5)])
    assert not task.in_test_split(train_prompts).any()
    assert not prompt_keys(train_prompts) & prompt_keys(test_prompts)


def test_test_set_larger_than_the_split_raises() -> None:
    task = PointerChasing(num_symbols=4, hops=2)  # 4! * 4 = 96 prompts, about 6 held out
    with pytest.raises(ValueError, match="distinct test problems"):
        task.test_set(50)


@pytest.mark.parametrize("name, settings", TASK_SETTINGS)
def test_holdout_fraction_matches_modulus(name: str, settings: dict) -> None:
    task = get_task(name, **settings)
    prompts, _ = task._sample_problems(20000, generator(7))
    fraction = task._index_in_test_split(prompts).float().mean().item()
    assert 0.6 / task.holdout_modulus < fraction < 1.4 / task.holdout_modulus
    salted = get_task(name, split_salt=1, **settings)
    assert not torch.equal(task._index_in_test_split(prompts), salted._index_in_test_split(prompts))


def test_split_does_not_depend_on_the_vocabulary() -> None:
    shifted = build_tiny_tokenizer(["x", "y", "z"] + [str(i) for i in range(8)])
    default, custom = PointerChasing(), PointerChasing(vocab=shifted)
    assert custom.symbol_ids.tolist() == [shifted.convert_tokens_to_ids(str(i)) for i in range(8)]
    assert default.symbol_ids.tolist() != custom.symbol_ids.tolist()
    def as_text(task: Task) -> list[tuple[str, str]]:
        return [(task.prompt_text(p), task.answer_text(a)) for p, a in task.test_set(50)]

    assert as_text(default) == as_text(custom)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        PointerChasing(vocab={"0": 0, "1": 1})


# --- verifiers ------------------------------------------------------------------------------
def test_pointer_chasing_answers_follow_the_permutation() -> None:
    task = PointerChasing(hops=5)
    for prompt, answer in task.test_set(100, seed=3):
        prompt_text = task.prompt_text(prompt)
        assert sorted(prompt_text.split()[:-1]) == task.symbols  # f is a permutation
        assert task.answer_text(answer).split() == chase_text(prompt_text, 5)


def switching_walk_text(prompt_text: str, num_symbols: int, hops: int) -> list[str]:
    """The walk read off the prompt's text, one word at a time."""
    words = prompt_text.split()
    f, g = words[:num_symbols], words[num_symbols:2 * num_symbols]
    current, walk = words[2 * num_symbols], []
    for switch in words[2 * num_symbols + 1:]:
        current = (g if switch == "1" else f)[int(current)]
        walk.append(current)
    assert len(walk) == hops
    return walk


def test_switching_chase_answers_follow_the_switched_tables() -> None:
    task = SwitchingChase()
    assert (task.prompt_length, task.answer_length) == (33, 16)
    used = set()
    for prompt, answer in task.test_set(100, seed=3):
        text = task.prompt_text(prompt)
        words = text.split()
        assert sorted(words[:8]) == task.symbols and sorted(words[8:16]) == task.symbols
        assert set(words[17:]) <= {"0", "1"}
        used |= set(words[17:])
        assert task.answer_text(answer).split() == switching_walk_text(text, 8, 16)
    assert used == {"0", "1"}  # both tables are used


def test_switching_chase_rejects_an_answer_that_follows_one_table_only() -> None:
    task = SwitchingChase(hops=6)
    prompts, answers = task.sample_train(128, generator(5))
    index = task.to_index(prompts)
    f, start = index[:, :8], index[:, 16]
    only_f, current = [], start
    for _ in range(6):
        current = f.gather(1, current[:, None]).squeeze(1)
        only_f.append(current)
    only_f = task.to_ids(torch.stack(only_f, 1))
    switched = (index[:, 17:] == 1).any(1)
    assert bool(switched.any())
    right = task.is_correct(prompts, only_f)
    assert bool(right[~switched].all())  # no switch picks g: the f-walk is the answer
    assert not bool(right[switched].all())  # otherwise it is wrong (unless g agrees with f)
    assert task.score(answers, prompts) == 1.0


def test_pointer_chasing_rejects_wrong_answers() -> None:
    task = PointerChasing()
    prompts, answers = task.sample_train(256, generator(2))
    wrong = answers.clone()
    position = torch.randint(task.answer_length, (256,), generator=generator(3))
    rows = torch.arange(256)
    shift = torch.randint(1, task.num_symbols, (256,), generator=generator(4))
    wrong[rows, position] = task.to_ids((task.to_index(answers[rows, position]) + shift) % 8)
    assert task.score(wrong, prompts) == 0.0
    masked = answers.clone()
    masked[:, 0] = 1  # the [MASK] id is not a symbol
    assert task.score(masked, prompts) == 0.0
    half = torch.cat([answers[:128], wrong[128:]])
    assert task.score(half, prompts) == 0.5
    assert task.is_correct(prompts[0], answers[0]).tolist() == [True]
    # A prompt holding a non-symbol is not a problem of the task: nothing is correct for it.
    broken = prompts.clone()
    broken[broken == task.vocab["0"]] = 1
    assert task.score(answers, broken) == 0.0
    with pytest.raises(ValueError, match="answer_ids"):
        task.is_correct(prompts, answers[:, :3])


@pytest.mark.parametrize("settings", [{}, {"num_symbols": 6, "out_degree": 3, "walk_length": 4}])
def test_branching_walk_accepts_every_valid_alternative(settings: dict) -> None:
    task = BranchingWalk(**settings)
    degree, length = task.out_degree, task.walk_length
    for prompt, gold in task.test_set(20, seed=5):
        expected = walks_text(task.prompt_text(prompt), task.num_symbols, degree, length)
        assert len(expected) == degree**length
        enumerated = task.valid_answers(prompt)
        assert {tuple(task.answer_text(walk).split()) for walk in enumerated} == expected
        assert tuple(task.answer_text(gold).split()) in expected
        alternatives = enumerated[(enumerated != gold).any(dim=1)]
        assert task.score(alternatives, prompt.expand(len(alternatives), -1)) == 1.0
        # Every sequence that is not a walk is rejected (checked exhaustively on 2 positions).
        for first, second in itertools.product(task.symbols, repeat=2):
            candidate = [first, second] + task.answer_text(gold).split()[2:]
            ok = task.is_correct(prompt, task.parse_answer(" ".join(candidate))).item()
            assert ok == any(walk[:2] == (first, second) and list(walk[2:]) == candidate[2:]
                             for walk in expected)


def test_branching_walk_samples_every_walk() -> None:
    # Answers are drawn uniformly over walks, which is what makes the beliefs multi-modal.
    task = BranchingWalk(walk_length=2)
    prompts, answers = task.sample_train(4000, generator(11))
    first_step_choice = [
        task.prompt_text(p).split()[int(task.prompt_text(p).split()[-1]) * 2 :][:2].index(
            task.answer_text(a).split()[0]
        )
        for p, a in zip(prompts, answers, strict=True)
    ]
    share = sum(first_step_choice) / len(first_step_choice)
    assert 0.45 < share < 0.55


# --- softness and coupling of branching_walk ------------------------------------------------
def test_branching_walk_beliefs_are_soft_and_sharpen_with_neighbours() -> None:
    task = BranchingWalk()
    mask = torch.full((task.answer_length,), 1)
    for prompt, gold in task.test_set(30, seed=2):
        posterior = task.answer_posterior(prompt, mask)
        assert torch.allclose(posterior.sum(dim=1), torch.ones(task.answer_length))
        first = posterior[0]
        assert sorted(first[first > 0].tolist()) == [0.5, 0.5]
        assert (posterior.max(dim=1).values <= 0.5 + 1e-6).all()
        # Commit a_2: a_3 is now spread over exactly succ(a_2), and a_1 sharpens.
        partial = mask.clone()
        partial[1] = gold[1]
        sharper = task.answer_posterior(prompt, partial)
        assert sharper[1, task.to_index(gold[1])] == 1.0
        assert (sharper[2] > 0).sum() == task.out_degree
        entropy = lambda p: -(p * p.clamp_min(1e-12).log()).sum(-1)  # noqa: E731
        assert (entropy(sharper[[0, 2]]) <= entropy(posterior[[0, 2]]) + 1e-6).all()


@pytest.mark.parametrize(
    "name, settings",
    [("branching_walk", {}), ("coupled_choices", {}), ("coupled_choices", {"alphabet": "shared"})],
)
def test_independent_marginals_fail_sequential_decoding_succeeds(name: str, settings: dict) -> None:
    # Sampling every position from its exact marginal at once (one parallel step) versus one
    # position at a time from the exact conditional (fully sequential decoding).
    task = get_task(name, **settings)
    mask = torch.full((task.answer_length,), 1)
    sampler = generator(13)
    parallel_ok = sequential_ok = 0
    problems = task.test_set(60, seed=4)
    for prompt, _ in problems:
        marginals = task.answer_posterior(prompt, mask)
        guess = torch.multinomial(marginals, 1, generator=sampler).squeeze(1)
        parallel_ok += task.is_correct(prompt, task.to_ids(guess)).item()
        partial = mask.clone()
        for position in range(task.answer_length):
            belief = task.answer_posterior(prompt, partial)[position]
            partial[position] = task.to_ids(torch.multinomial(belief, 1, generator=sampler))[0]
        sequential_ok += task.is_correct(prompt, partial).item()
    assert sequential_ok == len(problems)
    assert parallel_ok < 0.5 * len(problems)


@pytest.mark.parametrize(
    "settings",
    [{}, {"num_symbols": 5, "num_rows": 3, "length": 5}, {"alphabet": "shared", "num_rows": 3}],
)
def test_coupled_choices_accepts_every_valid_alternative(settings: dict) -> None:
    task = CoupledChoices(**settings)
    for prompt, gold in task.test_set(20, seed=6):
        expected = row_paths_text(task.prompt_text(prompt), task.num_rows, task.length)
        enumerated = task.valid_answers(prompt)
        assert {tuple(task.answer_text(a).split()) for a in enumerated} == expected
        assert len(enumerated) == len(expected)
        assert tuple(task.answer_text(gold).split()) in expected
        assert task.score(enumerated, prompt.expand(len(enumerated), -1)) == 1.0
        # Swapping one token for another candidate of its column breaks a pair unless expected.
        rows = task.prompt_text(prompt).split()
        for position in range(task.length):
            for r in range(task.num_rows):
                candidate = task.answer_text(gold).split()
                candidate[position] = rows[r * task.length + position]
                ok = task.is_correct(prompt, task.parse_answer(" ".join(candidate))).item()
                assert ok == (tuple(candidate) in expected)


@pytest.mark.parametrize("alphabet", ["per_row", "shared"])
def test_coupled_choices_beliefs_collapse_per_segment(alphabet: str) -> None:
    task = CoupledChoices(alphabet=alphabet)
    mask = torch.full((task.answer_length,), 1)
    seen_soft = 0
    for prompt, gold in task.test_set(40, seed=8):
        table = task.to_index(prompt).reshape(task.num_rows, task.length)
        junction = (table == table[:1]).all(dim=0)
        posterior = task.answer_posterior(prompt, mask)
        assert torch.allclose(posterior.max(dim=1).values[junction], torch.tensor(1.0))
        assert torch.allclose(posterior.max(dim=1).values[~junction], torch.tensor(0.5))
        free = (~junction).nonzero().squeeze(1).tolist()
        if not free:
            continue
        seen_soft += 1
        committed = mask.clone()
        committed[free[0]] = gold[free[0]]
        after = task.answer_posterior(prompt, committed).max(dim=1).values
        segment = junction.long().cumsum(0)
        same_segment = segment == segment[free[0]]
        # The committed position's segment becomes certain; other free positions stay at 1/R.
        assert torch.allclose(after[same_segment], torch.tensor(1.0))
        others = ~same_segment & ~junction
        assert torch.allclose(after[others], torch.tensor(0.5))
    assert seen_soft > 30


def test_coupled_choices_rows_are_canonical() -> None:
    # Shared alphabet: rows ordered by their first non-junction symbol, so that one problem
    # has one prompt (and the hash split cannot put a row-swapped copy in training).
    task = CoupledChoices(num_rows=3, alphabet="shared")
    prompts, _ = task.sample_train(500, generator(12))
    table = task.to_index(prompts).reshape(-1, 3, task.length)
    free = ~(table == table[:, :1]).all(dim=1)  # [n, k]
    first = free.float().argmax(dim=1)
    keys = table[torch.arange(500), :, first]  # [n, R]
    has_free = free.any(dim=1)
    assert has_free.float().mean() > 0.9
    assert (keys[has_free].diff(dim=1) > 0).all()


def test_coupled_choices_answers_pick_each_segment_row_uniformly() -> None:
    # Uniform over correct answers: a segment's row is independent of the previous segment's.
    task = CoupledChoices()
    prompts, answers = task.sample_train(3000, generator(15))
    first_rows, switches, pairs = [], 0, 0
    for answer in answers:
        letters = [symbol[0] for symbol in task.answer_text(answer).split()]
        rows = [letter for letter in letters if letter != "="]  # drop junction columns
        cuts = [
            letters[j] != "=" and letters[j + 1] == "=" for j in range(len(letters) - 1)
        ]  # free column followed by a junction: the next free column starts a new segment
        if rows:
            first_rows.append(rows[0] == "a")
        free_positions = [j for j, letter in enumerate(letters) if letter != "="]
        for left, right in zip(free_positions, free_positions[1:], strict=False):
            if any(cuts[left:right]):
                pairs += 1
                switches += letters[left] != letters[right]
    assert 0.45 < sum(first_rows) / len(first_rows) < 0.55
    assert pairs > 1000 and 0.45 < switches / pairs < 0.55


def test_coupled_choices_per_row_alphabets() -> None:
    task = CoupledChoices(num_rows=3)
    assert len(task.symbols) == 4 * task.num_symbols
    prompts, _ = task.sample_train(200, generator(14))
    for prompt in prompts[:50]:
        rows = task.prompt_text(prompt).split()
        for r, letter in enumerate("abc"):
            row = rows[r * task.length : (r + 1) * task.length]
            assert all(symbol[0] in (letter, "=") for symbol in row)
        junction_columns = [j for j in range(task.length) if rows[j].startswith("=")]
        for j in junction_columns:
            assert rows[j] == rows[task.length + j] == rows[2 * task.length + j]


def test_answer_posterior_rejects_impossible_commitments() -> None:
    task = BranchingWalk()
    prompt, gold = task.test_set(1, seed=0)[0]
    tokens = task.prompt_text(prompt).split()
    start = int(tokens[-1])
    succ = set(tokens[2 * start : 2 * start + 2])
    outside = next(s for s in task.symbols if s not in succ)
    partial = torch.full((task.answer_length,), 1)
    partial[0] = task.vocab[outside]
    with pytest.raises(ValueError, match="no valid answer"):
        task.answer_posterior(prompt, partial)


# --- text forms -----------------------------------------------------------------------------
@pytest.mark.parametrize("name, settings", TASK_SETTINGS)
def test_jsonl_round_trip_through_the_tokenizer(tmp_path, name: str, settings: dict) -> None:
    task = get_task(name, **settings)
    tokenizer = task.build_tokenizer()
    assert tokenizer.get_vocab() == task.vocab
    path = tmp_path / "test.jsonl"
    task.to_jsonl(path, 40, split="test", seed=9)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 40 and all(set(r) == {"prompt", "response"} for r in records)
    for record, (prompt, answer) in zip(records, task.test_set(40, seed=9), strict=True):
        assert tokenizer(record["prompt"])["input_ids"] == prompt.tolist()
        assert torch.equal(task.parse_answer(record["response"]), answer)
        assert tokenizer.decode(answer) == record["response"]
    train_path = tmp_path / "train.jsonl"
    task.to_jsonl(train_path, 40, split="train", seed=9)
    train_prompts = [json.loads(line)["prompt"] for line in train_path.read_text().splitlines()]
    assert not set(train_prompts) & {r["prompt"] for r in records}
    with pytest.raises(ValueError, match="split"):
        task.to_jsonl(path, 1, split="valid")


def test_parse_answer_handles_junk() -> None:
    task = PointerChasing(hops=3)
    prompt, answer = task.test_set(1)[0]
    text = task.answer_text(answer)
    assert task.is_correct(prompt, task.parse_answer(text + " 4 4")).item()
    assert task.parse_answer("0 nonsense").tolist() == [task.vocab["0"], -1, -1]
    assert not task.is_correct(prompt, task.parse_answer(text.rsplit(" ", 1)[0])).item()
