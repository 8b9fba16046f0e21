"""Export a Pion checkpoint as a Hugging Face transformers folder (Qwen3ForCausalLM + tokenizer + chat template),
and/or as one GGUF file for llama.cpp, Ollama and LM Studio.

    python export_hf.py --checkpoint checkpoints/pion_small_final.pt --out pion-small-hf
    python export_hf.py --checkpoint hf:SuperGoatScriptGuy/Pion/pion_small_final.pt --out pion-small-hf \\
        --dtype bfloat16 --push_to_hub YOU/pion-small
    python export_hf.py --checkpoint checkpoints/pion_small_final.pt --gguf pion-small.gguf --gguf_type q8_0

The folder loads with AutoModelForCausalLM / AutoTokenizer (see transformers_format.py for why it is exact).
"""
import os

from cli import DTYPES, ArgumentParser, run_cli, stop_signals_raise
from gguf_format import GGUF_TYPES, check_output, export_gguf
from transformers_format import export, push_to_hub


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a Pion checkpoint, or hf:OWNER/REPO/FILE")
    parser.add_argument("--out", default=None, help="a new (or empty) folder to write")
    parser.add_argument("--tokenizer", default=None, help="tokenizer JSON (default: the Pion tokenizer)")
    parser.add_argument("--allow_mismatch", action="store_true",
                        help="export a soft-capped model anyway (its outputs will differ from Pion's)")
    parser.add_argument("--push_to_hub", metavar="REPO", default=None, help="then upload the folder to OWNER/NAME")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="weight dtype in the folder")
    parser.add_argument("--gguf", metavar="PATH", default=None,
                        help="also (or instead) write one .gguf file for llama.cpp, Ollama, LM Studio")
    parser.add_argument("--gguf_type", choices=GGUF_TYPES, default="f32",
                        help="weight type in the .gguf file (q8_0: 8-bit, about a quarter of f32's size; "
                        "q4_0: 4-bit, about an eighth, the weights of --quantize int4)")
    args = parser.parse_args(argv)
    if not args.out and not args.gguf:
        parser.error("give --out FOLDER, --gguf PATH, or both")
    if args.push_to_hub and not args.out:
        parser.error("--push_to_hub uploads the --out folder: give --out too")
    if args.out and args.gguf and os.path.realpath(args.out) == os.path.realpath(args.gguf):
        parser.error(f"--out and --gguf both name {args.out}: give the folder and the file a path each")
    if args.gguf:
        check_output(args.gguf, args.gguf_type)  # refuse a taken path before the (slow) folder export
    with stop_signals_raise():  # a stopped export leaves no staging folder or file behind
        if args.out:
            export(args.checkpoint, args.out, args.tokenizer, args.allow_mismatch, args.dtype)
            print(f"wrote {args.out}: load it with AutoModelForCausalLM.from_pretrained({args.out!r})")
        if args.gguf:
            export_gguf(args.checkpoint, args.gguf, args.tokenizer, args.gguf_type, args.allow_mismatch)
            print(f"wrote {args.gguf}: run it with llama-cli -m {args.gguf}")
        if args.push_to_hub:
            push_to_hub(args.out, args.push_to_hub)

if __name__ == "__main__":
    run_cli(main)
