"""What projectors whose image token ``i`` is patch feature ``i`` share (linear, MLP): their side
of the part contract (:mod:`minivlm.registry`)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from minivlm.config import VLMConfig


class TokenPerPatch:
    """Mixin for projectors that map every feature token to one image token, in order."""

    @classmethod
    def check_config(cls, config: VLMConfig) -> None:
        """Nothing beyond the generic checks: any width maps to any width."""

    @classmethod
    def output_tokens(cls, config: VLMConfig, feature_tokens: int) -> int:
        return feature_tokens

    @classmethod
    def patch_weights(cls, token_weights: Tensor, config: VLMConfig, own_attention: Sequence[Tensor] = ()) -> Tensor:
        """``[P'] -> [P]``: token ``i`` is patch ``i``.

        Raises:
            ValueError: ``token_weights`` does not hold one weight per patch.
        """
        patches = config.encoder.n_patches
        if token_weights.numel() != patches:
            raise ValueError(f"projector {config.projector.kind!r}: expected {patches} image tokens, "
                             f"got {token_weights.numel()}")
        return token_weights.flatten()
