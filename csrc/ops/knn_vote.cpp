// Schema of the fused kNN memory lookup + label vote (AdaNPC's classifier).
//
// knn_vote(queries (B, D), memory (M, D), labels (M,) int64, num_classes C, k, temperature, metric)
//   -> (scores (B, C) fp32, indices (B, k) int64, similarities (B, k) fp32)
// metric: "cosine" (both sides normalised inside), "ip" (raw inner product, e.g. rows already
// L2-normalised at insert) or "l2" (similarity = -squared distance). Neighbours come sorted by
// decreasing similarity; when k > M the tail is padded with index -1 and similarity -inf.
// scores[b] = sum over the neighbours of softmax(similarity / temperature) * onehot(label).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(tta, m) {
  m.def(
      "knn_vote(Tensor queries, Tensor memory, Tensor labels, int num_classes, int k, "
      "float temperature, str metric) -> (Tensor, Tensor, Tensor)");
}
