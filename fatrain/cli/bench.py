"""``fatrain-bench``: time every attention backend over a sweep and write CSV, plots and a table.

    fatrain-bench                                   # the paper sweep (bench=paper), on the GPU
    fatrain-bench bench=smoke                       # tiny CPU sweep
    fatrain-bench bench=targets                     # only the cases the speed targets compare
    fatrain-bench bench=features                    # windows, packed documents, dropout
    fatrain-bench bench=decode                      # decoding against a KV cache (fatrain.bench.decode)
    fatrain-bench impls=[flash_v2,sdpa_flash] headdims=[128] out_dir=results
    fatrain-bench headdims=[64] out_dir=DIR append=true  # add to (or resume) DIR/attention_bench.csv

The sweep, the timing and the FLOP formula are documented in ``fatrain.bench``. After the
sweep, ``summary.numerator``'s TFLOP/s over each of ``summary.denominators`` is printed per
case, the ratios below ``summary.targets`` marked; with several windows, document lengths or
dropout rates, also the numerator's speedup of each such case over the plain one.
"""

from __future__ import annotations

import os

import hydra
from omegaconf import DictConfig, OmegaConf

from fatrain.bench import report, run_sweep, summarize, summarize_features
from fatrain.config import register_configs, validate_bench_config
from fatrain.runtime import user_errors

register_configs()


def output_dir(cfg) -> str:
    if cfg.out_dir:
        return cfg.out_dir
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else os.getcwd()


@hydra.main(version_base=None, config_path="pkg://fatrain.configs", config_name="bench")
def main(cfg: DictConfig) -> str:
    if cfg.kind != "attention":
        from fatrain.bench.decode import run_decode_bench
        with user_errors():
            validate_bench_config(cfg)  # the kind, then the decode bench's settings
            print(OmegaConf.to_yaml(cfg.decode))
            csv_path = run_decode_bench(cfg, output_dir(cfg))
        print(f"\nwrote {csv_path}")
        return csv_path
    with user_errors():
        validate_bench_config(cfg)  # a bad value fails before any work
        print(OmegaConf.to_yaml(cfg))
        csv_path = run_sweep(cfg, output_dir(cfg))
    plots = report(csv_path, make_plots=cfg.plot)
    print(f"\nwrote {csv_path}" + "".join(f"\nwrote {p}" for p in plots))
    s = cfg.summary
    if s.numerator in cfg.impls:
        summarize(csv_path, s.numerator, s.denominators, targets=s.targets, target_modes=s.target_modes,
                  target_min_seqlen=s.target_min_seqlen)
        if len(cfg.windows) > 1 or len(cfg.doc_lens) > 1 or len(cfg.dropout_ps) > 1 or len(cfg.variants) > 1:
            summarize_features(csv_path, s.numerator)
    return csv_path


if __name__ == "__main__":
    main()
