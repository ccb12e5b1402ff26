"""`h2o`: Heavy-Hitter Oracle (arXiv 2306.14048): a recent window plus the tokens with the largest accumulated
attention probability (plain softmax, tau = 1, no noise)."""

from kvstream.kvcache.policies.base import Policy, register


@register("h2o")
class H2OPolicy(Policy):
    scored = True

    def select(self, scores, m, cap, h, device):
        return self._topk(scores, min(m, cap))
