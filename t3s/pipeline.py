"""The whole T3S method as resumable stages over one run directory.

    sft_trajectory -> [trajectory_eval] -> bottleneck -> profile_base -> profile_bottleneck -> delta -> select
      -> train_<variant> ... -> rrt -> eval_<model> ... -> [loss_transfer] -> report

Training accuracy (the curve θb is read from) is measured inside the trajectory run with the Hugging Face
backend, or, with ``generation.backend=vllm``, on the checkpoints the trajectory saves at every evaluation step
(``trajectory_eval``: one engine per checkpoint). Either way the settings used (``max_new_tokens``, derived from
the longest training response unless set; sampling; prompts) are in ``trajectory/evaluation.json`` and the
curve is checked before θb is taken from it (:func:`t3s.bottleneck.check_curve`).

``train.mode=dllm`` (dLLM T3S, paper Appendix D): the trajectory, θb and Δc run on the AR selector
``model.selector`` (sharing the student's tokenizer); ``select`` writes the ``dllm_targets`` (Δc < −τ);
``train_sft`` / ``train_t3s`` train the block-diffusion student ``model.path`` with random / union masking;
``eval_*`` decode held-out prompts with :func:`t3s.dllm.diffusion_generate` (block-by-block denoising in the
training layout) and check the answers.

Before the first stage the whole run is checked (paths, model and tokenizer, data, held-out set, verifier,
vocabulary bounds): a mistake fails in seconds, before the run directory exists. Each stage declares the config
keys and input files it depends on and the outputs it writes (:class:`t3s.stages.Stage`), in its own module of
:mod:`t3s.pipeline_stages` (this module only composes them); it writes its outputs
atomically, then its marker ``<run_dir>/.stages/<stage>.json`` with those dependencies and the size and sha256
of every output file. A re-run reuses a finished stage only while its dependencies are unchanged and its outputs
intact, re-runs the others (and, through their outputs, whatever reads them) and says why; a killed run loses at
most the stage in flight. ``redo=`` (``t3s run --redo STAGE``) re-runs named stages anyway. Under ``torchrun``
every rank runs the pipeline, rank 0 writes the shared files and the markers.

Run directory::

    .t3s.lock, .t3s.lock.json   held while a run is in progress (t3s.runlock): a second run is refused
    config.yaml                 the resolved config of the latest run
    provenance.json             threads, determinism, seed, library versions, BLAS, CPU / GPU (t3s.runtime)
    trajectory/                 baseline SFT from θ0: metrics.jsonl (loss, training accuracy, truncated shares),
                                evaluation.json (generation settings), bottleneck/ (θb), final/ (θf, full runs)
    bottleneck.json             θb's step and accuracy, how it was found
    profile/base, profile/bottleneck, delta/    c_t at θ0 and θb, Δc_t (Parquet + provenance)
    selections/<rule>/          per-token 0/1 weights (t3s, neg_t3s, static_*, random)
    variants/<name>/            metrics.jsonl, summary.json, final/ (a Hugging Face checkpoint)
    eval/<model>.json           held-out accuracy of base and every variant
    diagnostics/                loss_transfer.json (optional)
    report/                     report.md, results.json, *.png
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from pathlib import Path

from t3s import distributed as D
from t3s.config import Config, to_dict, to_yaml
from t3s.io import write_json_atomic, write_text_atomic
from t3s.pipeline_stages import (accuracy, bottleneck, delta, evaluate, loss_transfer, profile, report, rrt, select,
                                 train, train_dllm, trajectory, trajectory_eval, validate)
from t3s.pipeline_stages.context import SELECTION_VARIANTS, RunContext, load_eval_records
from t3s.pipeline_stages.context import gold_checker as _gold_checker
from t3s.runlock import run_dir_lock
from t3s.stages import Stage, pin_inputs, resolve_redo, run_stages

__all__ = ["Pipeline", "run_pipeline", "load_eval_records", "SELECTION_VARIANTS", "_gold_checker"]


class Pipeline(RunContext):
    """The T3S pipeline for one config. ``run()`` executes (or resumes) every stage in order.

    The stage bodies live in :mod:`t3s.pipeline_stages`; the ``stage_*`` methods call them with this object as
    the run context (one place to wrap or replace a stage).
    """

    def stages(self) -> list[Stage]:
        """Every stage in order, with what it depends on and what it writes (see :mod:`t3s.stages`)."""
        s = [trajectory.stage(self, self.stage_trajectory)]
        if self.offline_accuracy:
            s.append(trajectory_eval.stage(self, self.stage_trajectory_eval))
        s += [bottleneck.stage(self, self.stage_bottleneck),
              *(profile.stage(self, partial(self.stage_profile, w), w) for w in profile.WHICH),
              delta.stage(self, self.stage_delta),
              select.stage(self, self.stage_select)]
        s += [train.stage(self, partial(self.stage_train, v), v) for v in self.trained_variants()]
        if "rrt" in self.cfg.variants:
            s.append(rrt.stage(self, self.stage_rrt))
        s += [evaluate.stage(self, partial(self.stage_eval, m), m) for m in ["base", *self.cfg.variants]]
        if self.cfg.diagnostics.loss_transfer:
            s.append(loss_transfer.stage(self, self.stage_loss_transfer))
        s.append(report.stage(self, self.stage_report, s))
        return s

    def run(self, *, redo: Iterable[str] = ()) -> Path:
        from t3s.runtime import apply_runtime, provenance, runtime_state

        apply_runtime(self.cfg.runtime, self.cfg.train.seed)
        if self.dllm and D.launched_distributed():
            raise ValueError("train.mode=dllm: the block-diffusion trainer runs on a single process; launch "
                             "`t3s run` without torchrun")
        rt = self.cfg.runtime
        D.init_distributed(None if self.cfg.distributed.backend == "auto" else self.cfg.distributed.backend,
                           timeout_s=rt.dist_timeout_s)
        trust_stat = self.cfg.runtime.verify == "stat"
        # digested before validation reads them: a stage that finds one changed since then fails, naming it;
        # then one run at a time on the run directory (rank 0 holds the lock)
        pins = pin_inputs(self.run_dir, self.external_inputs(), trust_stat=trust_stat) if D.is_main() else None
        self.validate()  # on every rank (all fail alike), before anything is written
        stages = self.stages()
        resolve_redo(redo, stages)  # an unknown --redo name fails before the run directory exists
        with D.naming_lost_ranks(rt.dist_timeout_s), run_dir_lock(self.run_dir, log=self.log):
            if D.is_main():
                write_text_atomic(self.run_dir / "config.yaml", to_yaml(self.cfg))
                write_json_atomic(self.run_dir / "provenance.json",
                                  provenance(self.cfg.runtime, self.cfg.train.seed))
            D.barrier()
            run_stages(self.run_dir, to_dict(self.cfg), stages, redo=redo, trust_stat=trust_stat, log=self.log,
                       record={"runtime": runtime_state()}, pins=pins)
        return self.run_dir / "report" / "report.md"

    def external_inputs(self) -> dict[str, str]:
        return validate.external_inputs(self)

    def validate(self) -> None:
        validate.validate(self)

    # ---- the stages (bodies in t3s.pipeline_stages) -----------------------------------------------------------

    def stage_trajectory(self) -> dict:
        return trajectory.run(self)

    def stage_trajectory_eval(self) -> dict:
        return trajectory_eval.run(self)

    def stage_bottleneck(self) -> dict:
        return bottleneck.run(self)

    def stage_profile(self, which: str) -> dict:
        return profile.run(self, which)

    def stage_delta(self) -> dict:
        return delta.run(self)

    def stage_select(self) -> dict:
        return select.run(self)

    def stage_train(self, variant: str) -> dict:
        return train.run(self, variant)

    def stage_train_dllm(self, variant: str) -> dict:
        return train_dllm.run(self, variant)

    def stage_rrt(self) -> dict:
        return rrt.run(self)

    def stage_eval(self, name: str) -> dict:
        return evaluate.run(self, name)

    def stage_loss_transfer(self) -> dict:
        return loss_transfer.run(self)

    def stage_report(self) -> dict:
        return report.run(self)

    # ---- helpers that callers outside the pipeline use ----------------------------------------------------------

    def _verifier(self):
        return self.verifier()

    def accuracy_hook(self, *, use_curve: bool):
        return accuracy.accuracy_hook(self, use_curve=use_curve)

    def accuracy_settings(self) -> dict:
        return accuracy.accuracy_settings(self)

    def variant_examples(self, variant: str):
        return select.variant_examples(self, variant)

    def rrt_final_source(self) -> Path:
        return rrt.final_source(self)


def run_pipeline(cfg: Config, *, redo: Iterable[str] = (), **kw) -> Path:
    """Run (or resume) the whole pipeline; returns the report's path. ``redo``: stages to re-run anyway."""
    return Pipeline(cfg, **kw).run(redo=redo)
