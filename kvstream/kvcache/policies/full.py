"""`full`: keep every token (the baseline; equal to transformers' own cache)."""

from kvstream.kvcache.policies.base import Policy, register


@register("full")
class FullPolicy(Policy):
    keeps_prefix = True

    def select(self, scores, m, cap, h, device):
        return self._first(m, m, h, device)
