"""Hook specifications of thinkpress (pluggy project name ``"thinkpress"``).

A plugin is a module (or object) with functions decorated with :data:`thinkpress.hookimpl` whose
names match the specs below. Third-party plugins are found through the ``thinkpress`` entry-point
group; built-in plugins are registered after them. pluggy is used to *discover and register*
components; the runner (``thinkpress.core.runner``), not pluggy, runs the stages in order.

Registration hooks receive a ``register`` callable. The plugin manager calls each plugin's
implementation separately, so every registered component is recorded with the plugin that
registered it (``--plugins NAME`` selects by that name).
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("thinkpress")


@hookspec
def register_samplers(register):
    """Register sampler components (stage 1: problems -> graded samples).

    :param register: call ``register(cls)`` once per component class. ``cls`` must subclass
        :class:`thinkpress.core.stages.Sampler`, define a unique ``name`` and a nested pydantic
        ``Config`` (``extra="forbid"``, every field with a description). The first sampler a
        plugin registers is that plugin's default sampler.
    :return: nothing; the return value is ignored.

    Called once per plugin when the registry is built. Exceptions mark the plugin broken (it is
    listed by ``thinkpress plugins`` and skipped) instead of stopping the CLI.
    """


@hookspec
def register_selectors(register):
    """Register selector components (stage 2: samples -> SFT examples and/or preference pairs).

    :param register: call ``register(cls)`` with a subclass of
        :class:`thinkpress.core.stages.Selector`. The first one a plugin registers is its default;
        others are chosen with ``stages.selector=<name>`` (e.g. for ablations).
    :return: nothing.

    Called once per plugin; exceptions mark the plugin broken.
    """


@hookspec
def register_refiners(register):
    """Register refiner components (stage 3: rewrite the reasoning of training examples).

    :param register: call ``register(cls)`` with a subclass of
        :class:`thinkpress.core.stages.Refiner`. Refiners of all selected plugins chain, in the
        order of ``--plugins``; ``stages.refiners=[...]`` sets the chain explicitly.
    :return: nothing.

    Called once per plugin; exceptions mark the plugin broken.
    """


@hookspec
def register_pruners(register):
    """Register pruner components (stage 4), of two kinds.

    :param register: call ``register(cls)`` with a subclass of
        :class:`thinkpress.core.stages.TracePruner` (removes tokens from training examples; trace
        pruners chain in ``--plugins`` order) or :class:`thinkpress.core.stages.KVPruner` (a
        decode-time cache policy the engine applies while generating; each selected KV pruner adds
        evaluation variants).
    :return: nothing.

    Called once per plugin; exceptions mark the plugin broken.
    """


@hookspec
def register_trainers(register):
    """Register trainer components (stage 5: training set -> adapter or model).

    :param register: call ``register(cls)`` with a subclass of
        :class:`thinkpress.core.stages.Trainer`. The first one a plugin registers is its default.
    :return: nothing.

    Called once per plugin; exceptions mark the plugin broken.
    """


@hookspec
def register_engines(register):
    """Register generation backends.

    :param register: call ``register(name, factory)``; ``factory(config) -> Engine`` receives the
        resolved :class:`thinkpress.core.config.RunConfig` and returns an object implementing
        :class:`thinkpress.core.engines.base.Engine`. The built-in ``hf`` engine is registered by
        the core. A name registered twice is an error naming both plugins. The factory may carry
        ``capabilities`` (a set of :class:`~thinkpress.core.engines.base.Capability`: what the engine
        does beyond generating; without it, generation only), checked against what the plan needs
        before any model loads, and ``deterministic = True`` when the same inputs give the same tokens
        on CPU (otherwise the report says run-to-run determinism is not established). It may also
        carry ``check(config)``, called at plan time for every engine the plan uses (raise
        :class:`~thinkpress.core.errors.ConfigError` for bad ``engine_options.<name>`` or a missing
        install), and ``auto = True`` to be chosen by ``engine: auto`` when its check passes.
    :return: nothing.
    """


@hookspec
def register_datasets(register):
    """Register datasets by name.

    :param register: call ``register(name, loader)``; ``loader(split, path=None, limit=None,
        seed=0, skip_invalid=False) -> list[Problem]`` returns validated
        :class:`thinkpress.core.data.Problem` records (``path`` overrides where the data is read
        from). Built in: ``arith`` (generated), ``gsm8k``, ``math500``.
    :return: nothing.
    """


@hookspec
def register_scorers(register):
    """Register token-importance scorers (used by trace pruners such as TokenSkip).

    :param register: call ``register(name, factory)``. ``factory(ctx, **options)`` is called by the
        pruner with its :class:`~thinkpress.core.context.StageContext` (the run's engine, config and
        logging) and the options from the pruner's config (``scorer_options``), and returns a scorer
        object with

        * ``score(prompt: str, text: str) -> list[tuple[str, float]]``: each token of ``text`` as
          ``(surface, score)``, higher = more important; the surfaces must concatenate to exactly
          ``text`` (pruners aggregate scores to words by character position);
        * optionally ``score_batch(prompts, texts) -> list[list[tuple[str, float]]]`` (batched).

        A factory may carry a pydantic ``Options`` model (options are then checked before the run
        starts) and a ``check_available()`` classmethod that raises ``ConfigError`` when something
        it needs is missing. :class:`thinkpress.core.scoring.TokenScorer` is the base class that
        provides all of this. Built in (plugin ``tokenskip``): ``self-information``, ``entropy``,
        ``llmlingua2``. Names are global; registering a taken name is an error naming both plugins.
    :return: nothing.
    """


@hookspec
def register_presets(register):
    """Contribute settings to named presets (``--preset NAME``).

    :param register: call ``register(preset, settings, *, when_selected=False)``.

        * ``preset``: the preset's name. Registering settings for a name nobody registered before
          creates the preset (the core registers ``smoke`` and ``default``: model, data, evaluation).
        * ``settings``: a partial run config, e.g. ``{"components": {"my-sampler": {"n": 8}}}``.
        * ``when_selected=False``: the settings apply whenever the preset is used. Use it for the
          settings of your own components (``components.<name>``); components that do not run ignore
          theirs.
        * ``when_selected=True``: the settings apply only when your plugin is selected with
          ``--plugins`` (by name or through a bundle). Use it for what only your method needs, such
          as other data sizes or cache budgets.

        Layering, later wins: every plugin's unconditional settings (the built-in plugins', then
        third-party plugins'), then the selected plugins' ``when_selected`` settings in
        ``--plugins`` order, then the config file, the flags and ``--set``. Mappings merge key by
        key; a list replaces a list.
    :return: nothing.

    A preset may also name the components that run when no selected plugin provides a stage
    (``fallback: {sampler: ..., selector: ..., trainer: ...}``) and the plugins selected when
    ``--plugins`` is not given (``plugins: [...]``); the ``baseline`` plugin sets both.
    """


@hookspec
def register_bundles(register):
    """Declare names that stand for several plugins in ``--plugins``.

    :param register: call ``register(name, members, description)``. ``--plugins NAME`` then
        selects every plugin in ``members`` (a list of plugin names, in order); ``core plugins``
        lists the bundle. A bundle name must not be a plugin name of another plugin.
    :return: nothing.
    """


@hookspec
def register_commands(cli):
    """Add commands to the ``thinkpress`` / ``core`` command-line interface.

    :param cli: the root :class:`click.Group`; add commands with ``@cli.command()`` or
        ``cli.add_command(...)``.
    :return: nothing.

    Called once when the CLI starts; a plugin whose hook raises is reported as broken and the CLI
    keeps working.
    """


@hookspec(firstresult=True)
def run_stage(stage, component, inputs, ctx):
    """Execute one stage component; wrap it to add timing, memory accounting or logging.

    :param stage: stage name (``"sampler"``, ``"selector"``, ``"refiner"``, ``"pruner"``,
        ``"trainer"``).
    :param component: the instantiated component (its validated config is ``component.config``).
    :param inputs: dict of the stage inputs (``problems``, ``samples``, ``data``) as the stage's
        method expects them.
    :param ctx: the :class:`thinkpress.core.context.StageContext` of this stage.
    :return: the stage output (``list[Sample]``, ``TrainingSet`` or ``TrainResult``).

    ``firstresult=True``: the first non-``None`` result wins. The core's own implementation
    (``trylast``) calls the component's stage method. A plugin wraps execution with
    ``@hookimpl(wrapper=True)`` and ``result = yield``; it must return the result (it may replace
    it). The pipeline records wall time and peak memory of every stage in ``report.json``.
    """
