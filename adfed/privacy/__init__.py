"""Client-level differential privacy: accounting (:mod:`.accountant`), the phone's
transforms and the server's noisy sums (:mod:`.dp`), and the round vocabulary for sparse
tables (:mod:`.vocabulary`). Importing this package registers, on the engine's seams:

- update transforms ``clip`` and ``skellam`` (:mod:`adfed.fl.pipeline`), which
  ``pipeline.build`` adds when ``privacy.dp`` is on;
- the aggregator wrapper ``dp`` (:mod:`adfed.fl.aggregators`), which replaces the
  aggregator with DP-FedAvg's Gaussian sum or DP-FTRL's tree sum when ``privacy.dp`` is on.
"""

from __future__ import annotations

from adfed.config import Config
from adfed.fl import aggregators, pipeline
from adfed.privacy.dp import Clip, SkellamShare, build_wrapper


def _dp_wrapper(agg: aggregators.Aggregator, cfg: Config,
                ctx: aggregators.BuildContext) -> aggregators.Aggregator | None:
    if not cfg.privacy.dp:
        return None
    if ctx.plan is None:
        raise ValueError("privacy.dp is on but the engine built no privacy plan")
    return build_wrapper(ctx.plan, ctx.spec, ctx.vocabulary, seed=cfg.seed,
                         distributed=cfg.privacy.noise == "distributed",
                         target_quantile=cfg.privacy.target_quantile, clip_lr=cfg.privacy.clip_lr)


pipeline.register("clip", lambda cfg: Clip())
pipeline.register("skellam", lambda cfg: SkellamShare(scale=cfg.privacy.quantization_scale,
                                                      noise_multiplier=cfg.privacy.noise_multiplier,
                                                      cohort=cfg.fl.clients_per_round))
aggregators.register_wrapper("dp", _dp_wrapper)
