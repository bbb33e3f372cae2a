"""Reusable parts that methods share; plugins import them next to :mod:`thinkpress.api`.

* :mod:`thinkpress.toolkit.sampling`: sample and grade N completions per problem with the run's
  engine (resumable, seeded per problem), and a configurable graded sampler to subclass;
* :mod:`thinkpress.toolkit.lora`: LoRA training (completion-only SFT, a loop for any loss,
  truncation checks, completion log-probs);
* :mod:`thinkpress.toolkit.models`: a second model for a method (e.g. a token scorer's).
"""
