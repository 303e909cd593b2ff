"""Evaluation: the paper's benchmark suite (`plm eval`), lm-evaluation-harness's `plm` model
(`plm lm-eval`), and self-refining generation through the ARIES template. See docs/eval.md.

Modules: `lm` (the scoring engine over a checkpoint), `mc_tasks` (log-likelihood multiple
choice), `gen_tasks` (GSM8K, HumanEval, MBPP, self-refinement), `runner` (settings, runs,
result files), `report` (tables beside the published numbers), `data` (data directories, local
JSONL and Hugging Face), `answers` / `code_tasks` / `sandbox` (scoring), `lm_eval_model` and
`lm_eval_cli` (lm-evaluation-harness).
"""
