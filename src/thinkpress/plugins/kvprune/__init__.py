"""Built-in ``kvprune`` plugin: decode-time KV-cache pruning, one module (and plugin name) per policy.

``--plugins kvprune`` selects every policy; ``--plugins rkv`` (or ``streaming``, ``h2o``, ``snapkv``,
``rpc``, ``knorm``, ``keydiff``) one of them, and ``--plugins tokenskip,rkv`` trains with TokenSkip and
evaluates the trained model with R-KV. A KV pruner makes evaluation variants: the run's full-cache
variants (base, trained) decoded again under the policy at each budget, with peak KV bytes, decode
speed and agreement with the full-cache output.

See :mod:`.base` for the scorer + selector + trigger machinery and the physical eviction, and
``docs/kvprune.md`` for each policy's formula, parameters and measured numbers.
"""

from __future__ import annotations

from thinkpress import hookimpl

POLICIES = ("streaming", "h2o", "snapkv", "rkv", "rpc", "knorm", "keydiff")
"""Policy plugin names; each is the module ``thinkpress.plugins.kvprune.<name>``."""


@hookimpl
def register_bundles(register):
    register("kvprune", list(POLICIES), "every KV-cache policy")
