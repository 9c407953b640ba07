// Lookahead speculation's n-gram trie (kvloom/speculation/ngram_trie.py) in C++, with the same counts and the
// same drafts.
//
// In Python, counting one token's windows took ~4 us (eleven dictionary steps, each a node object). A
// request's trie catches up on its prompt and output only in a step that drafts, so at 32 concurrent requests
// such a step spent 86-100 ms on it before a forward pass of ~35 (docs/performance.md, fifteenth sitting).
// Here nodes live in one array and edges in one open-addressed table.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <queue>
#include <tuple>
#include <utility>
#include <vector>

namespace {

class NGramTrie {
 public:
  explicit NGramTrie(int64_t max_len) : max_len_(max_len) {
    if (max_len < 1) throw pybind11::value_error("max_len must be at least 1");
    nodes_.emplace_back();   // the root, id 0
  }

  int64_t num_nodes() const { return num_nodes_; }

  // Count the windows ending at each of `tokens`, continuing from `active` (what the previous call returned;
  // None: a new stream). active[j] is the node of the open window of length j + 1 ending at the latest token,
  // -1 where there is none. delta -1 takes back a stream added before; its return value is not for a later
  // call (the nodes it removed are reused).
  std::vector<int32_t> extend(const std::vector<int64_t>& tokens, std::optional<std::vector<int32_t>> active,
                              int64_t delta) {
    if (delta != 1 && delta != -1) throw pybind11::value_error("delta must be 1 or -1");
    std::vector<int32_t> open = active ? *active : std::vector<int32_t>{};
    std::vector<int32_t> grown;
    std::vector<int32_t> removed;   // cut from their parents: freed once the call is done (active may pass them)
    for (const int64_t t : tokens) {
      grown.clear();
      const size_t walks = std::min<size_t>(open.size() + 1, static_cast<size_t>(max_len_));
      for (size_t j = 0; j < walks; ++j) {
        const int32_t node = j == 0 ? 0 : open[j - 1];
        int32_t child = node < 0 ? -1 : find(node, t);
        if (node >= 0 && child < 0 && delta > 0) child = add_child(node, t);
        if (child >= 0) {
          nodes_[child].count += static_cast<int32_t>(delta);
          if (nodes_[child].count <= 0) {   // no window starts with this path any more
            cut(node, t, child);
            removed.push_back(child);
          }
        }
        grown.push_back(child);
      }
      if (grown.size() > static_cast<size_t>(max_len_ - 1)) grown.resize(max_len_ - 1);
      open.swap(grown);
    }
    for (const int32_t id : removed) release(id);
    if (delta < 0) return {};
    return open;
  }

  // The likeliest continuations of the longest suffix of `tail` (the context's last max_match tokens at most)
  // seen before: (tokens, parents) depth-first, the likelier child first; None when no suffix was seen.
  std::optional<std::pair<std::vector<int64_t>, std::vector<int64_t>>> draft(const std::vector<int64_t>& tail,
                                                                            int64_t max_tokens, int64_t max_match,
                                                                            int64_t max_branches) const {
    const int64_t longest = std::min({max_match, static_cast<int64_t>(tail.size()), max_len_ - 1});
    for (int64_t m = longest; m > 0; --m) {
      int32_t node = 0;
      for (size_t i = tail.size() - m; i < tail.size() && node >= 0; ++i) node = find(node, tail[i]);
      if (node >= 0 && nodes_[node].first >= 0) return best_first(node, max_tokens, max_len_ - m, max_branches);
    }
    return std::nullopt;
  }

 private:
  // Children are a list in the order they were added (first, next), linked both ways so one leaves in O(1).
  struct Node {
    int32_t count = 0;
    int32_t first = -1, last = -1, next = -1, prev = -1;
    int64_t token = 0;
  };

  // The edges (parent, token) -> child in one open-addressed table: linear probing, and removal by shifting
  // the run after a hole back (no tombstones). std::unordered_map's node per edge made counting 4x slower.
  class EdgeTable {
   public:
    EdgeTable() { rehash(1 << 10); }
    int32_t find(uint64_t key) const {
      for (size_t i = slot(key);; i = (i + 1) & mask_) {
        if (keys_[i] == key) return values_[i];
        if (keys_[i] == kEmpty) return -1;
      }
    }
    void insert(uint64_t key, int32_t value) {
      if ((size_ + 1) * 10 > keys_.size() * 7) rehash(keys_.size() * 2);
      size_t i = slot(key);
      while (keys_[i] != kEmpty) i = (i + 1) & mask_;
      keys_[i] = key;
      values_[i] = value;
      ++size_;
    }
    void erase(uint64_t key) {
      size_t i = slot(key);
      while (keys_[i] != key) {
        if (keys_[i] == kEmpty) return;
        i = (i + 1) & mask_;
      }
      for (size_t j = (i + 1) & mask_; keys_[j] != kEmpty; j = (j + 1) & mask_) {
        const size_t home = slot(keys_[j]);
        // Move j into the hole at i unless its home lies in (i, j] (cyclically): it would then be unreachable.
        const bool stays = i <= j ? (i < home && home <= j) : (i < home || home <= j);
        if (!stays) {
          keys_[i] = keys_[j];
          values_[i] = values_[j];
          i = j;
        }
      }
      keys_[i] = kEmpty;
      --size_;
    }

   private:
    static constexpr uint64_t kEmpty = ~0ull;
    size_t slot(uint64_t key) const { return static_cast<size_t>((key * 0x9E3779B97F4A7C15ull) >> shift_); }
    void rehash(size_t capacity) {
      std::vector<uint64_t> keys(capacity, kEmpty);
      std::vector<int32_t> values(capacity, -1);
      keys.swap(keys_);
      values.swap(values_);
      mask_ = capacity - 1;
      shift_ = 64 - __builtin_ctzll(capacity);
      size_ = 0;
      for (size_t i = 0; i < keys.size(); ++i)
        if (keys[i] != kEmpty) insert(keys[i], values[i]);
    }
    std::vector<uint64_t> keys_;
    std::vector<int32_t> values_;
    size_t mask_ = 0, size_ = 0;
    int shift_ = 0;
  };

  static uint64_t key(int32_t parent, int64_t token) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(parent)) << 32) | static_cast<uint32_t>(token);
  }

  int32_t find(int32_t parent, int64_t token) const { return edges_.find(key(parent, token)); }

  int32_t add_child(int32_t parent, int64_t token) {
    int32_t id;
    if (!free_.empty()) {
      id = free_.back();
      free_.pop_back();
    } else {
      id = static_cast<int32_t>(nodes_.size());
      nodes_.emplace_back();
    }
    Node& n = nodes_[id];
    n = Node();
    n.token = token;
    Node& p = nodes_[parent];
    n.prev = p.last;
    if (p.last >= 0) nodes_[p.last].next = id;
    else p.first = id;
    p.last = id;
    edges_.insert(key(parent, token), id);
    ++num_nodes_;
    return id;
  }

  void cut(int32_t parent, int64_t token, int32_t child) {
    edges_.erase(key(parent, token));
    Node& n = nodes_[child];
    Node& p = nodes_[parent];
    if (n.prev >= 0) nodes_[n.prev].next = n.next;
    else p.first = n.next;
    if (n.next >= 0) nodes_[n.next].prev = n.prev;
    else p.last = n.prev;
    n.prev = n.next = -1;
    --num_nodes_;
  }

  // A removed node's id goes back for reuse. Its subtree left with it (the windows through it were the ones
  // being removed); any edge still below is dropped too, so a reused id never finds an old child.
  void release(int32_t id) {
    for (int32_t kid = nodes_[id].first; kid >= 0;) {
      const int32_t next = nodes_[kid].next;
      edges_.erase(key(id, nodes_[kid].token));
      release(kid);
      kid = next;
    }
    nodes_[id].first = nodes_[id].last = -1;
    free_.push_back(id);
  }

  using Pick = std::tuple<int64_t, int64_t, double, int32_t>;   // token, parent pick, probability, node

  // Best-first by the product of count shares along the path, at most max_branches children a node and
  // max_tokens in all; ties go to the earlier pushed (the order of ngram_trie.py's heap).
  std::pair<std::vector<int64_t>, std::vector<int64_t>> best_first(int32_t start, int64_t max_tokens,
                                                                   int64_t max_depth, int64_t max_branches) const {
    using Entry = std::tuple<double, int64_t, int64_t, int64_t, int32_t>;   // -p, order, token, parent, node
    std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> heap;
    std::vector<Pick> picked;
    std::vector<int64_t> depth_of;
    int64_t order = 0;
    std::vector<std::pair<int64_t, int32_t>> best;
    auto push_children = [&](int32_t parent, int64_t parent_pick, double prob, int64_t depth) {
      if (depth >= max_depth) return;
      int64_t total = 0;
      best.clear();
      for (int32_t kid = nodes_[parent].first; kid >= 0; kid = nodes_[kid].next) {
        total += nodes_[kid].count;
        best.emplace_back(nodes_[kid].token, kid);
      }
      std::stable_sort(best.begin(), best.end(), [&](const auto& a, const auto& b) {
        return nodes_[a.second].count > nodes_[b.second].count;
      });
      if (static_cast<int64_t>(best.size()) > max_branches) best.resize(max_branches);
      for (const auto& [token, child] : best) {
        const double p = prob * nodes_[child].count / static_cast<double>(total);
        heap.emplace(-p, order++, token, parent_pick, child);
      }
    };
    push_children(start, -1, 1.0, 0);
    while (!heap.empty() && static_cast<int64_t>(picked.size()) < max_tokens) {
      const auto [neg_p, ord, token, parent_pick, child] = heap.top();
      heap.pop();
      picked.emplace_back(token, parent_pick, -neg_p, child);
      depth_of.push_back(parent_pick < 0 ? 1 : depth_of[parent_pick] + 1);
      push_children(child, static_cast<int64_t>(picked.size()) - 1, -neg_p, depth_of.back());
    }
    return depth_first(picked);
  }

  // The picks depth-first, each node's children in pick order (the likelier first).
  static std::pair<std::vector<int64_t>, std::vector<int64_t>> depth_first(const std::vector<Pick>& picked) {
    const int64_t n = static_cast<int64_t>(picked.size());
    std::vector<std::vector<int64_t>> kids(n + 1);   // kids[parent + 1]
    for (int64_t i = 0; i < n; ++i) kids[std::get<1>(picked[i]) + 1].push_back(i);
    std::vector<int64_t> tokens, parents;
    std::vector<std::pair<int64_t, int64_t>> stack;   // (pick, its parent's place in the output)
    for (auto it = kids[0].rbegin(); it != kids[0].rend(); ++it) stack.emplace_back(*it, -1);
    while (!stack.empty()) {
      const auto [i, parent] = stack.back();
      stack.pop_back();
      tokens.push_back(std::get<0>(picked[i]));
      parents.push_back(parent);
      const int64_t me = static_cast<int64_t>(tokens.size()) - 1;
      for (auto it = kids[i + 1].rbegin(); it != kids[i + 1].rend(); ++it) stack.emplace_back(*it, me);
    }
    return {tokens, parents};
  }

  int64_t max_len_;
  int64_t num_nodes_ = 0;
  std::vector<Node> nodes_;
  std::vector<int32_t> free_;
  EdgeTable edges_;   // (parent, token) -> child
};

}  // namespace

void register_ngram_trie(pybind11::module_& m) {
  // module_local, as the decode stack: two ISA builds can be loaded in one process.
  pybind11::class_<NGramTrie>(m, "NGramTrie", pybind11::module_local())
      .def(pybind11::init<int64_t>())
      .def("num_nodes", &NGramTrie::num_nodes)
      .def("extend", &NGramTrie::extend, pybind11::arg("tokens"), pybind11::arg("active"), pybind11::arg("delta"))
      .def("draft", &NGramTrie::draft, pybind11::arg("tail"), pybind11::arg("max_tokens"), pybind11::arg("max_match"),
           pybind11::arg("max_branches"));
}
