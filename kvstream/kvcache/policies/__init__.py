"""Selection policies (one per file) and their registry."""

from kvstream.kvcache.policies import full, h2o, keyformer, sink, window  # noqa: F401  (registration)
from kvstream.kvcache.policies.base import POLICY_REGISTRY, Policy, get_policy

__all__ = ["POLICY_REGISTRY", "Policy", "get_policy"]
