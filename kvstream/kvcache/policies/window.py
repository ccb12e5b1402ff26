"""`window`: keep the last k tokens (a sliding window)."""

from kvstream.kvcache.policies.base import Policy, register


@register("window")
class WindowPolicy(Policy):
    keeps_prefix = True

    def select(self, scores, m, cap, h, device):
        return self._first(m, 0, h, device)
