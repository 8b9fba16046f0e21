"""Export a Pion checkpoint as a Hugging Face transformers folder (Qwen3ForCausalLM + tokenizer + chat template).

    python export_hf.py --checkpoint checkpoints/pion_small_final.pt --out pion-small-hf
    python export_hf.py --checkpoint hf:SuperGoatScriptGuy/Pion/pion_small_final.pt --out pion-small-hf \\
        --dtype bfloat16 --push_to_hub YOU/pion-small

The folder loads with AutoModelForCausalLM / AutoTokenizer (see hf_export.py for why it is exact).
"""
from cli import DTYPES, ArgumentParser, run_cli
from hf_export import export, push_to_hub


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a Pion checkpoint, or hf:OWNER/REPO/FILE")
    parser.add_argument("--out", required=True, help="a new (or empty) folder to write")
    parser.add_argument("--tokenizer", default=None, help="tokenizer JSON (default: the Pion tokenizer)")
    parser.add_argument("--allow_mismatch", action="store_true",
                        help="export a soft-capped model anyway (its outputs will differ from Pion's)")
    parser.add_argument("--push_to_hub", metavar="REPO", default=None, help="then upload the folder to OWNER/NAME")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="weight dtype in the folder")
    args = parser.parse_args(argv)
    export(args.checkpoint, args.out, args.tokenizer, args.allow_mismatch, args.dtype)
    print(f"wrote {args.out}: load it with AutoModelForCausalLM.from_pretrained({args.out!r})")
    if args.push_to_hub:
        push_to_hub(args.out, args.push_to_hub)


if __name__ == "__main__":
    run_cli(main)
