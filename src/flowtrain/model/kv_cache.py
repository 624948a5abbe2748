"""Key/value cache for incremental decoding.

Why: without a cache every generated token re-runs attention over the whole context (O(T^2) per token);
with it each new token costs one position per layer. The buffers are allocated lazily on the first write so
they take the dtype and device of the keys actually produced (e.g. bfloat16 under autocast), which keeps the
cached keys and the new queries in the same dtype for scaled_dot_product_attention.
"""

from __future__ import annotations

import torch


class LayerCache:
    """One layer's view of a KVCache: where its new positions start, and how to append keys/values."""

    def __init__(self, cache: KVCache, layer_idx: int) -> None:
        self._cache = cache
        self._layer_idx = layer_idx

    @property
    def start(self) -> int:
        """Number of positions already cached: the absolute position of the first new token."""
        return self._cache.length

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B,H,T,D] after the cached positions; return all keys/values so far [B,H,start+T,D]."""
        return self._cache.write(self._layer_idx, k, v)


class KVCache:
    """Per-layer key/value buffers of a fixed capacity (in positions), filled left to right.

    GPT.forward(idx, kv_cache=cache) writes every layer's new keys/values at positions
    [length, length + T) and then advances `length` by T, so the next call continues where this one ended.
    """

    def __init__(self, n_layer: int, capacity: int) -> None:
        if n_layer < 1 or capacity < 1:
            raise ValueError(f"KVCache needs n_layer >= 1 and capacity >= 1, got {n_layer}, {capacity}")
        self.n_layer = n_layer
        self.capacity = capacity
        self.length = 0
        self._keys: list[torch.Tensor | None] = [None] * n_layer
        self._values: list[torch.Tensor | None] = [None] * n_layer

    def layer(self, layer_idx: int) -> LayerCache:
        return LayerCache(self, layer_idx)

    def check_room(self, n_new: int) -> None:
        """Fail before any layer writes, so an overflowing call leaves the cache untouched."""
        if self.length + n_new > self.capacity:
            raise ValueError(
                f"KV cache overflow: {self.length} cached + {n_new} new positions > capacity {self.capacity}; "
                "reset the cache (or make a larger one) before feeding more tokens"
            )

    def write(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, heads, n_new, head_dim = k.shape
        end = self.length + n_new
        if end > self.capacity:
            self.check_room(n_new)
        keys = self._keys[layer_idx]
        if keys is None or keys.shape[0] != batch or keys.dtype != k.dtype or keys.device != k.device:
            if self.length:
                raise ValueError(
                    "KV cache: batch size, dtype or device changed while positions are cached; reset it first"
                )
            shape = (batch, heads, self.capacity, head_dim)
            self._keys[layer_idx] = keys = k.new_empty(shape)
            self._values[layer_idx] = v.new_empty(shape)
        values = self._values[layer_idx]
        assert values is not None
        keys[:, :, self.length : end] = k
        values[:, :, self.length : end] = v
        return keys[:, :, :end], values[:, :, :end]

    def advance(self, n_new: int) -> None:
        """Called once per forward, after every layer has written its n_new positions."""
        self.length += n_new

    def reset(self) -> None:
        """Forget the cached positions (buffers are kept and overwritten)."""
        self.length = 0
