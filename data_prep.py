"""Getting pretraining data: download the published shards, or tokenize your own text into the same
format (the shard format and the loader that reads it are data.py's).

    python data_prep.py download --num_shards 4 --out data/mixed     # the published (N, 2048) shards
    python data_prep.py prepare --input my_texts/ --out data/mine      # your own .txt / .jsonl files
"""
import itertools
import json
import os
import re
import signal
import sys

import numpy as np
from tqdm import tqdm

from data import PretrainData, open_shard, read_metadata
from jsonl import jsonl_objects
from tokenizer import EOS_ID, PAD_ID, TOKENIZER_PATH, load_tokenizer
from cli import ArgumentParser, PionError, Stopped, first_line, positive_int, run_cli, stop_signals_raise
from files import atomic_write, check_new_folder, write_folder_atomically

DEFAULT_REPO = "SuperGoatScriptGuy/PreprocessedMIXED"


DOWNLOAD_RECORD = "download.json"  # {"repo": ...}: which repo a download folder holds shards of


def check_download_folder(out, repo):
    """Refuse an --out that holds anything but a download of the same repo (DOWNLOAD_RECORD, written before
    the first shard): its shard_00000.npy would be overwritten by another data set's. A download can thus be
    rerun to finish or to add shards, and never mixes two data sets, even when the first was interrupted."""
    record = os.path.join(out, DOWNLOAD_RECORD)
    if os.path.isfile(record):
        try:
            with open(record) as f:
                earlier = json.load(f).get("repo")
        except (OSError, ValueError, AttributeError):
            earlier = None
        if earlier != repo:
            raise PionError(f"--out {out} holds a download of {earlier or 'an unknown repo'}, not {repo}; choose a "
                            f"new --out")
    else:
        check_new_folder(out)


def download(repo, num_shards, out):
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HFValidationError
    if num_shards < 1:
        raise PionError(f"--num_shards must be at least 1, got {num_shards}")
    check_download_folder(out, repo)
    names = [f"shard_{i:05d}.npy" for i in range(num_shards)]
    try:
        HfApi().repo_info(repo, repo_type="dataset")  # reachable: only then is anything written
        os.makedirs(out, exist_ok=True)
        atomic_write(os.path.join(out, DOWNLOAD_RECORD), lambda f: f.write(json.dumps({"repo": repo}).encode()))
        snapshot_download(repo_id=repo, repo_type="dataset", allow_patterns=names + ["metadata.json"], local_dir=out)
    except (OSError, HFValidationError) as e:  # hub, network and disk errors are all OSErrors
        raise PionError(f"cannot download {repo}: {first_line(e)}")
    missing = [name for name in names if not os.path.exists(os.path.join(out, name))]
    if missing:
        raise PionError(f"{repo} has no {missing[0]} ({len(missing)} of the {num_shards} shards asked for are "
                        f"missing); ask for fewer with --num_shards")
    rows = sum(len(open_shard(os.path.join(out, name))) for name in names)
    print(f"downloaded {num_shards} shard(s), {rows:,} rows, of {repo} to {out}")
    metadata = read_metadata(out)
    if metadata:
        print(f"metadata: {json.dumps(metadata)}")


def find_input_files(inputs):
    """The .txt and .jsonl files among `inputs`, directories walked in sorted order."""
    files = []
    for item in inputs:
        if os.path.isdir(item):
            for root, dirs, names in os.walk(item):
                dirs.sort()
                files += [os.path.join(root, n) for n in sorted(names) if n.endswith((".txt", ".jsonl"))]
        elif not os.path.isfile(item):
            raise PionError(f"input not found: {item}")
        elif not item.endswith((".txt", ".jsonl")):
            raise PionError(f"{item}: unsupported input; use .txt (a document per file) or .jsonl (one per line)")
        else:
            files.append(item)
    if not files:
        raise PionError(f"no .txt or .jsonl files in {' '.join(inputs)}")
    return files


def file_documents(files, text_field):
    """Each .txt file is one document (read in chunks); each line of a .jsonl file is a JSON object with one in
    text_field."""
    for path in files:
        if path.endswith(".txt"):
            yield text_chunks(path)  # consumed before the next document is asked for
            continue
        for line_number, record in jsonl_objects(path):
            if not isinstance(record.get(text_field), str):
                raise PionError(f"{path}:{line_number} has no text field {text_field!r} (see --text_field)")
            yield record[text_field]


def text_chunks(path):
    """A file's text, READ_CHARS characters at a time: a 1 GB corpus file is never one string in memory."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte order mark at the start is no text
            yield from iter(lambda: f.read(READ_CHARS), "")
    except UnicodeDecodeError:
        raise PionError(f"{path} is not UTF-8 text")


def hf_documents(name, split, text_field):
    """The text_field of each row of a Hugging Face dataset, streamed (nothing is downloaded whole)."""
    import datasets
    try:
        for row in datasets.load_dataset(name, split=split, streaming=True):
            if not isinstance(row.get(text_field), str):
                raise PionError(f"dataset {name} has no text field {text_field!r} (its fields: {', '.join(row)}); "
                                f"see --text_field")
            yield row[text_field]
    except (OSError, ValueError) as e:  # not found, offline, bad split: datasets raises these
        raise PionError(f"cannot read the dataset {name} (split {split}): {first_line(e)}")


# Text is tokenized about PIECE_CHARS at a time: memory stays flat in the document's size, and tokenizers
# encodes many short texts faster than a few long ones (4K-char pieces: 2x the speed of 64K ones).
PIECE_CHARS = 1 << 12
READ_CHARS = 1 << 20  # a .txt file is read this much at a time
# Text per encode_batch call (run on all cores), in UTF-8 bytes: its encodings cost ~40x that, and bytes
# follow the token count more closely than characters do (a Chinese character is 3 bytes and 1-3 tokens).
BATCH_BYTES = 2 << 20
# Where the byte-level pre-tokenizer (GPT-2's pattern, Pion's) always cuts, so BPE never merges across:
# - before a space that follows a non-space and precedes a letter: the match holding the non-space ends at it
#   (no alternative for a non-space crosses whitespace), and " word" starts the next;
# - between a letter or digit and a following mark that is neither (text without spaces, as Chinese and
#   Japanese are written, has one at most sentences): runs of letters or of digits end where their class does.
SAFE_CUT = re.compile(r"(?<=\S) (?=[^\W\d_])|(?<=[^\W_])(?=[^\w\s])")
# A run this long without a safe cut (no space nor punctuation) is cut anyway, at a character boundary: one
# pre-token this long is no text anyone wants tokenized exactly, and kept whole it would grow without bound.
MAX_PIECE_CHARS = 1 << 16


def document_pieces(chunks, piece_chars=PIECE_CHARS, max_piece_chars=MAX_PIECE_CHARS):
    """A document (its text in chunks) as (piece, is_last) of about piece_chars characters or more, cut at
    SAFE_CUT: the pieces' ids, joined, are the whole document's ids, whatever its length. Only a run of more
    than max_piece_chars characters without a safe cut is cut elsewhere; memory stays flat either way."""
    buffer = ""
    for chunk in chunks:
        buffer, start = buffer + chunk, 0
        while len(buffer) - start > piece_chars:
            cut = SAFE_CUT.search(buffer, start + piece_chars, start + max_piece_chars)
            if cut:
                end = cut.start()
            elif len(buffer) - start > max_piece_chars:
                end = start + max_piece_chars
            else:
                break  # the next chunk may hold the cut
            yield buffer[start:end], False
            start = end
        buffer = buffer[start:]
    yield buffer, True


def prepare(documents, out, source, seq_len=2048, tokenizer_path=None, shard_rows=16384):
    """Tokenize documents, each followed by EOS_ID, pack them into rows of seq_len tokens and write
    shard_rows rows per uint16 shard; the final partial row is padded with PAD_ID.

    Everything is written into a hidden staging folder beside `out`, which is renamed to `out` only when
    it is complete: a failed or interrupted prepare leaves no partial data set that training could take, and
    the staging folder of one that was killed outright goes when the next one writes (files.remove_leftovers)."""
    if seq_len < 1 or shard_rows < 1:
        raise PionError(f"--seq_len and --shard_rows must be positive, got {seq_len} and {shard_rows}")
    out = os.path.abspath(out)
    check_new_folder(out)
    tokenizer = load_tokenizer(tokenizer_path)
    if tokenizer.get_vocab_size() > 2 ** 16:
        raise PionError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens, too many for uint16 shards")

    def write(folder):
        summary = write_shards(tokenizer, documents, folder, seq_len, shard_rows)
        metadata = dict(**summary, seq_len=seq_len, source=source, tokenizer=tokenizer_path or TOKENIZER_PATH)
        atomic_write(os.path.join(folder, "metadata.json"), lambda f: f.write(json.dumps(metadata, indent=2).encode()))
        PretrainData(folder, seq_len)  # what we wrote must load
        return summary

    summary = write_folder_atomically(out, write)
    print(f"wrote {summary['total_tokens']:,} tokens from {summary['n_documents']:,} documents as "
          f"{summary['n_rows']:,} rows of {seq_len} tokens in {summary['n_shards']} shard(s) to {out}")


def write_shards(tokenizer, documents, folder, seq_len, shard_rows):
    """Tokenize and pack the documents into shard files in folder; returns the counts for metadata.json."""
    shard_tokens = shard_rows * seq_len
    pending, n_pending = [np.empty(0, dtype=np.uint16)], 0  # tokens not yet in a shard
    n_tokens = n_documents = n_shards = 0

    def write_shard(rows):
        nonlocal n_shards
        atomic_write(os.path.join(folder, f"shard_{n_shards:05d}.npy"), lambda f: np.save(f, rows))
        n_shards += 1

    pieces = (piece for document in documents
              for piece in document_pieces([document] if isinstance(document, str) else document) if piece[0])
    with tqdm(desc="tokenizing", unit="tok", unit_scale=True) as bar:
        while batch := take_batch(pieces, BATCH_BYTES):
            encodings = tokenizer.encode_batch([text for text, _ in batch], add_special_tokens=False)
            ids = np.fromiter(itertools.chain.from_iterable(e.ids + [EOS_ID] * is_last
                                                            for e, (_, is_last) in zip(encodings, batch)),
                              dtype=np.uint16)
            pending.append(ids)
            n_pending, n_tokens = n_pending + len(ids), n_tokens + len(ids)
            n_documents += sum(is_last for _, is_last in batch)
            bar.update(len(ids))
            # Write only shards that more text follows, so a corpus too small for two rows writes nothing.
            if n_pending > shard_tokens:
                tokens = np.concatenate(pending)
                n_full = (len(tokens) - 1) // shard_tokens
                for rows in tokens[:n_full * shard_tokens].reshape(n_full, shard_rows, seq_len):
                    write_shard(rows)
                pending = [tokens[n_full * shard_tokens:]]
                n_pending = len(pending[0])

    tail = np.concatenate(pending)
    n_tail_rows = -(-len(tail) // seq_len)  # rounded up: the last row is padded
    n_rows = n_shards * shard_rows + n_tail_rows
    if n_rows < 2:  # one row for train and one for val
        raise PionError(f"not enough text for two rows of {seq_len} tokens (got {n_tokens} tokens from "
                        f"{n_documents} documents); add text or lower --seq_len")
    tail_rows = np.full((n_tail_rows, seq_len), PAD_ID, dtype=np.uint16)
    tail_rows.flat[:len(tail)] = tail
    write_shard(tail_rows)
    return dict(total_tokens=n_tokens, n_rows=n_rows, n_shards=n_shards, n_documents=n_documents)


def take_batch(pieces, max_bytes):
    """The next pieces, up to about max_bytes bytes of UTF-8 text (at least one piece)."""
    batch, size = [], 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece[0].encode("utf-8", "surrogatepass"))
        if size >= max_bytes:
            break
    return batch


# ----------------------------------------------------------------------------------------------------


def main(argv=None):
    parser = ArgumentParser(description="Get pretraining data: download the published shards or "
                                                 "tokenize your own text into the same format.")
    commands = parser.add_subparsers(dest="command", required=True)

    get = commands.add_parser("download", help="download the first N published shards from the Hugging Face hub")
    get.add_argument("--num_shards", type=positive_int, required=True, help="how many shards, from the first")
    get.add_argument("--out", required=True, help="new data dir, or an earlier download of the same --repo to add to")
    get.add_argument("--repo", default=DEFAULT_REPO, help="Hugging Face dataset repo")

    make = commands.add_parser("prepare", help="tokenize text into shards; the validation split is the last "
                                               "~2%% of the rows of every shard")
    source = make.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", metavar="PATH", help=".txt files (each one document), .jsonl files "
                        "(one JSON object per line, text in --text_field) or directories holding them")
    source.add_argument("--hf_dataset", metavar="NAME", help="a Hugging Face dataset name or local dataset dir")
    make.add_argument("--hf_split", default="train", help="the split of --hf_dataset")
    make.add_argument("--text_field", default="text", help="field holding the text in .jsonl lines and dataset rows")
    make.add_argument("--out", required=True, help="new data dir (an existing one with shards is refused)")
    make.add_argument("--seq_len", type=positive_int, default=2048,
                      help="tokens per row: the longest --seq_len train.py can use on this data")
    make.add_argument("--shard_rows", type=positive_int, default=16384, help="rows per shard file")
    make.add_argument("--tokenizer", default=None, help="tokenizer JSON (default: the Pion tokenizer)")

    args = parser.parse_args(argv)
    if args.command == "download":
        download(args.repo, args.num_shards, args.out)
    else:
        if args.input:
            documents, source = file_documents(find_input_files(args.input), args.text_field), args.input
        else:
            documents = hf_documents(args.hf_dataset, args.hf_split, args.text_field)
            source = f"{args.hf_dataset}:{args.hf_split}"
        try:
            with stop_signals_raise():
                prepare(documents, args.out, source, args.seq_len, args.tokenizer, args.shard_rows)
        except Stopped as stopped:
            name = signal.Signals(stopped.signum).name
            print(f"stopped by {name}: nothing was written to {args.out}", file=sys.stderr)
            sys.exit(128 + stopped.signum)  # the shell's code for a process ended by that signal: 130, 143


if __name__ == "__main__":
    run_cli(main)
