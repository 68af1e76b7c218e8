"""The one place where every dllm op's schema is defined.

The schemas live in Python (not in the compiled extension) so that ``torch.ops.dllm.*`` exists on
every install, including one where the extension could not be built. Each op's module under
``dllm_kernels.ops`` registers the fake kernel and the dispatching implementation; the argument
names and defaults here are the public API that ``docs/ops.md`` describes.
"""

import torch

lib = torch.library.Library("dllm", "DEF")

SCHEMAS = {
    "logits_to_confidence": (
        "logits_to_confidence(Tensor logits, Tensor? eligible=None, *, float temperature=0.0, "
        'str score="prob", bool tempered_score=False, Tensor? banned=None, int seed=0, '
        "int offset=0) -> (Tensor token, Tensor score)"
    ),
    "logits_to_confidence_partial": (
        "logits_to_confidence_partial(Tensor logits, Tensor? eligible=None, *, int vocab_start=0, "
        'float temperature=0.0, str score="prob", bool tempered_score=False, Tensor? banned=None, '
        "int seed=0, int offset=0) -> Tensor"
    ),
    "logits_to_confidence_merge": (
        "logits_to_confidence_merge(Tensor states, *, int vocab_size, float temperature=0.0, "
        'str score="prob", bool tempered_score=False, int seed=0, int offset=0) '
        "-> (Tensor token, Tensor score)"
    ),
    "credit_confidence": (
        "credit_confidence(Tensor logits, Tensor eligible, Tensor(a!) credit_token, "
        "Tensor(b!) credit_value, *, float alpha=0.7, float beta=0.8, float gamma=0.2, "
        "Tensor? banned=None) -> (Tensor token, Tensor score)"
    ),
    "select_unmask": (
        'select_unmask(Tensor score, Tensor eligible, *, str policy="topk", Tensor? k=None, '
        "float threshold=0.9, bool inclusive=False, float factor=1.0, int min_per_row=1, "
        "float low_threshold=0.0, int radius=0, float margin=0.0, Tensor? token=None, Tensor(a!)? x=None) "
        "-> (Tensor selected, Tensor count)"
    ),
    "block_attention": (
        "block_attention(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor q_start, Tensor kv_len, *, "
        "Tensor? k_new=None, Tensor? v_new=None, int block_size=0, float? scale=None, "
        "bool return_lse=False) -> (Tensor out, Tensor lse)"
    ),
    "attention_mass": (
        "attention_mass(Tensor q, Tensor k_cache, Tensor lse, Tensor q_start, Tensor kv_len, *, "
        "Tensor? query_mask=None, Tensor? key_mask=None, int block_size=0, float? scale=None) "
        "-> (Tensor mass, Tensor top)"
    ),
    "prune_24": "prune_24(Tensor weight, Tensor? score=None) -> Tensor mask",
    "compress_24": "compress_24(Tensor weight, Tensor? mask=None) -> (Tensor values, Tensor meta)",
    "decompress_24": "decompress_24(Tensor values, Tensor meta) -> Tensor weight",
    "sparse24_mm": "sparse24_mm(Tensor x, Tensor values, Tensor meta, Tensor? bias=None) -> Tensor",
    "armor_linear": (
        "armor_linear(Tensor x, Tensor wrap_in, Tensor values, Tensor meta, Tensor wrap_out, "
        "Tensor? bias=None) -> Tensor"
    ),
}

for _schema in SCHEMAS.values():
    lib.define(_schema)
