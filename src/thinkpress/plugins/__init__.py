"""The built-in plugins. Each registers its components through the same hooks as a third-party plugin."""

BUILTIN_PLUGINS: dict[str, str] = {
    "core": "thinkpress.core.builtins",
    "baseline": "thinkpress.plugins.baseline",
    "tokensqueeze": "thinkpress.plugins.tokensqueeze",
    "tokenskip": "thinkpress.plugins.tokenskip",
    "kvprune": "thinkpress.plugins.kvprune",
    **{p: f"thinkpress.plugins.kvprune.{p}" for p in ("streaming", "h2o", "snapkv", "rkv", "rpc", "knorm", "keydiff")},
}
"""Built-in plugin name -> module, registered after the entry-point plugins. ``core`` is the core's own
plugin: the ``hf`` engine, the datasets, the base presets and the innermost ``run_stage``."""
