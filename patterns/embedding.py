"""The token-embedding lookup: Gather(W[V, H], input_ids) on axis 0, W a weight, ids a graph input."""

from onnx_rewriter.matching import TokenEmbedding, check, is_weight

NOT_TOKEN_IDS = ("attention_mask", "position_ids", "cache_position")


class Embedding:
    name = "embedding"
    stage = "embedding"
    anchors = ("Gather",)

    def match(self, node, ctx):
        w, ids = node.inputs
        check(node.attrs.get("axis", 0) == 0, "embedding: Gather is not on axis 0", node)
        check(is_weight(w) and len(w.shape) == 2, "embedding: table is not a 2-D weight", node)
        check(ids in ctx.graph.inputs, "embedding: indices are not a graph input", node)
        # the runtime feeds the embeddings of the tokens: a lookup of the mask or positions is no token
        # embedding (found by fuzzing: Gather(W, attention_mask) was fused as one)
        check(ids.name not in NOT_TOKEN_IDS, f"embedding: Gather reads '{ids.name}', not the token ids", node)
        return node.outputs[0], TokenEmbedding(weight=w, ids=ids)


PATTERN = Embedding()
