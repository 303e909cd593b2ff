"""lm-evaluation-harness's command line with the ``plm`` model registered.

    python -m plm.eval.lm_eval_cli --model plm --model_args pretrained=DIR --tasks arc_easy
    plm lm-eval --model plm --model_args pretrained=DIR --tasks my_task --include_path tasks/

lm-eval 0.4.13 finds models only in its in-process registry (no plugin entry points), so
the bare ``lm_eval`` command cannot see ``plm``; this wrapper imports the registration and
then hands every argument to ``lm_eval`` unchanged (``run``/``ls``/``validate`` included).
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    try:
        import lm_eval.__main__ as harness
    except ImportError:
        from plm.errors import PLMError
        raise PLMError("lm-evaluation-harness is not installed (pip install 'plm[eval]', "
                       "which pins lm-eval==0.4.13)") from None
    import plm.eval.lm_eval_model  # noqa: F401  (registers --model plm)

    saved = sys.argv
    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    try:
        harness.cli_evaluate()
    except SystemExit as e:  # argparse --help / usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
