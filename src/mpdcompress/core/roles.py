"""What a layer does inside a transformer block, read from its qualified name.

Hugging Face families name the same building blocks differently (BERT's ``intermediate.dense``
is GPT-2's ``mlp.c_fc`` and Llama's ``mlp.up_proj``). This table is the one place that maps
those names to roles, so users select layers by role (``select_roles("mlp")``) instead of
writing name patterns per architecture. Adding a family is adding its suffixes here.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from ..errors import UnknownNameError

__all__ = ["ROLES", "ROLE_GROUPS", "layer_role", "role_and_block", "mlp_pairs", "select_roles", "roles_of"]

# Name suffix -> role. Longer suffixes win, so BERT's "attention.output.dense" (attention output)
# is told apart from its "output.dense" (MLP down projection).
_SUFFIXES: dict[str, str] = {
    # BERT, RoBERTa, ViT, ELECTRA
    "intermediate.dense": "mlp_up",
    "output.dense": "mlp_down",
    "attention.output.dense": "attn_out",
    "self.query": "attn_qkv",
    "self.key": "attn_qkv",
    "self.value": "attn_qkv",
    "attention.query": "attn_qkv",
    "attention.key": "attn_qkv",
    "attention.value": "attn_qkv",
    # DistilBERT
    "ffn.lin1": "mlp_up",
    "ffn.lin2": "mlp_down",
    "attention.q_lin": "attn_qkv",
    "attention.k_lin": "attn_qkv",
    "attention.v_lin": "attn_qkv",
    "attention.out_lin": "attn_out",
    # GPT-2 (transformers' Conv1D layers)
    "mlp.c_fc": "mlp_up",
    "mlp.c_proj": "mlp_down",
    "attn.c_attn": "attn_qkv",
    "attn.c_proj": "attn_out",
    # Llama, Mistral, Qwen, Gemma (gated MLPs)
    "mlp.gate_proj": "mlp_gate",
    "mlp.up_proj": "mlp_up",
    "mlp.down_proj": "mlp_down",
    "self_attn.q_proj": "attn_qkv",
    "self_attn.k_proj": "attn_qkv",
    "self_attn.v_proj": "attn_qkv",
    "self_attn.o_proj": "attn_out",
    # OPT, CLIP, Whisper, BART
    "fc1": "mlp_up",
    "fc2": "mlp_down",
    "self_attn.out_proj": "attn_out",
    # GPT-NeoX, Falcon
    "mlp.dense_h_to_4h": "mlp_up",
    "mlp.dense_4h_to_h": "mlp_down",
    "attention.query_key_value": "attn_qkv",
    "self_attention.query_key_value": "attn_qkv",
    "self_attention.dense": "attn_out",
    # T5
    "DenseReluDense.wi": "mlp_up",
    "DenseReluDense.wi_0": "mlp_gate",
    "DenseReluDense.wi_1": "mlp_up",
    "DenseReluDense.wo": "mlp_down",
    "SelfAttention.q": "attn_qkv",
    "SelfAttention.k": "attn_qkv",
    "SelfAttention.v": "attn_qkv",
    "SelfAttention.o": "attn_out",
}
_ORDERED = sorted(_SUFFIXES.items(), key=lambda item: -len(item[0]))

ROLES = ("mlp_up", "mlp_gate", "mlp_down", "attn_qkv", "attn_out")
ROLE_GROUPS = {"mlp": ("mlp_up", "mlp_gate", "mlp_down"), "attention": ("attn_qkv", "attn_out"), "all": ROLES}


def layer_role(name: str) -> str | None:
    """The role of the layer with qualified ``name``, or ``None`` when no known family names it so."""
    return role_and_block(name)[0]


def role_and_block(name: str) -> tuple[str | None, str | None]:
    """The layer's role and the qualified name of the transformer block it belongs to (what is
    left of ``name`` without the role's suffix): BERT's ``encoder.layer.3.intermediate.dense``
    and ``encoder.layer.3.output.dense`` are the MLP of block ``encoder.layer.3``."""
    for suffix, role in _ORDERED:
        if name == suffix or name.endswith("." + suffix):
            return role, name[: -len(suffix)].rstrip(".")
    return None, None


def mlp_pairs(names: Iterable[str]) -> list[tuple[str, str]]:
    """``(up or gate, down)`` pairs of the same block among ``names``: the layers whose hidden
    units are joined by the MLP's activation."""
    by_block: dict[str, dict[str, list[str]]] = {}
    for name in names:
        role, block = role_and_block(name)
        if role in ROLE_GROUPS["mlp"]:
            by_block.setdefault(block, {}).setdefault("down" if role == "mlp_down" else "up", []).append(name)
    return [(up, down) for parts in by_block.values() for down in parts.get("down", []) for up in parts.get("up", [])]


def roles_of(model: nn.Module) -> dict[str, str]:
    """Qualified name -> role of every module in ``model`` that has one."""
    return {name: role for name, _ in model.named_modules() if (role := layer_role(name)) is not None}


def select_roles(*roles: str | Iterable[str]):
    """A ``filter_fn(module, name)`` for :func:`~mpdcompress.mpdify_` that selects the layers of
    the given roles: any of :data:`ROLES` or the groups ``"mlp"``, ``"attention"``, ``"all"``."""
    wanted: set[str] = set()
    for item in roles:
        for role in [item] if isinstance(item, str) else item:
            if role in ROLE_GROUPS:
                wanted.update(ROLE_GROUPS[role])
            elif role in ROLES:
                wanted.add(role)
            else:
                raise UnknownNameError(f"unknown layer role {role!r}; choose from {', '.join([*ROLE_GROUPS, *ROLES])}")
    if not wanted:
        raise UnknownNameError("select_roles needs at least one role")
    return lambda module, name: layer_role(name) in wanted
