// One row's k largest logits, found in the same pass that computes the row's statistics.
//
// The row is offered tile by tile in increasing column order. A candidate buffer of 2k entries
// fills with every value above the current threshold (the k-th best so far); when it is full it
// is cut back to the k best (nth_element, O(k)) and the threshold rises. Once the buffer has
// been cut, a value equal to the threshold can never enter: every member holding that value has
// a lower column, and among equal values the lower column wins. So only values strictly above
// the threshold are kept, and most tiles are skipped whole on their maximum. Torch-free.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace rcd_ext::cpu {

struct Candidate {
  float value;
  int64_t column;
};

// The selection order: larger value first, among equal values the lower column first.
inline bool ranks_before(const Candidate& a, const Candidate& b) {
  return a.value > b.value || (a.value == b.value && a.column < b.column);
}

class TopKSelector {
 public:
  explicit TopKSelector(int64_t k) : k_(k) { buffer_.reserve(static_cast<size_t>(2 * k)); }

  void reset() {
    buffer_.clear();
    has_threshold_ = false;
  }

  // Offers x[0..n) at columns col0.., after every earlier column of the row. No NaN in x.
  void offer(const float* x, int64_t n, int64_t col0, float tile_max) {
    if (has_threshold_ && !(tile_max > threshold_)) return;
    for (int64_t i = 0; i < n; ++i) {
      if (has_threshold_ && !(x[i] > threshold_)) continue;
      buffer_.push_back({x[i], col0 + i});
      if (static_cast<int64_t>(buffer_.size()) == 2 * k_) cut();
    }
  }

  // The k best of the row (the row must have had >= k columns), sorted by column so that the
  // embedding rows are then read in address order.
  const std::vector<Candidate>& finish() {
    if (static_cast<int64_t>(buffer_.size()) > k_) cut();
    std::sort(buffer_.begin(), buffer_.end(),
              [](const Candidate& a, const Candidate& b) { return a.column < b.column; });
    return buffer_;
  }

 private:
  void cut() {
    std::nth_element(buffer_.begin(), buffer_.begin() + (k_ - 1), buffer_.end(), ranks_before);
    buffer_.resize(static_cast<size_t>(k_));
    threshold_ = buffer_[k_ - 1].value;
    has_threshold_ = true;
  }

  int64_t k_;
  std::vector<Candidate> buffer_;
  float threshold_ = 0.0f;
  bool has_threshold_ = false;
};

}  // namespace rcd_ext::cpu
