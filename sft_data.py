"""Chat data for supervised fine-tuning: load conversations, render and mask them with
chat_template.render_conversation, and pack or pad them into training rows.

Labels are aligned with input_ids (the model shifts them) and -100 marks tokens that are not trained:
only assistant replies, their "\\n" and the <|endoftext|> after them are learned.
`python sft_data.py --data_file F` shows one rendered row with the trained text between « and ».
"""
import itertools
import os
from collections import Counter

import numpy as np
import torch

from chat_template import render_conversation
from jsonl import jsonl_objects
from loss import IGNORE_INDEX
from tokenizer import PAD_ID, load_tokenizer
from cli import ArgumentParser, PionError, first_line, positive_int, run_cli

SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}  # OpenHermes 2.5 uses these
OPENAI_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
NO_TRAINED_TOKEN = "no trained token within seq_len"


def normalize_conversation(row):
    """A ShareGPT row (conversations: [{from, value}]) or an OpenAI-style one (messages: [{role, content}])
    -> (messages, None), or (None, why the row is malformed)."""
    if row.get("conversations") is not None:
        turns, role_key, text_key, roles = row["conversations"], "from", "value", SHAREGPT_ROLES
    else:
        turns, role_key, text_key, roles = row.get("messages"), "role", "content", OPENAI_ROLES
    if not isinstance(turns, list) or not turns:
        return None, "no turns"
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            return None, "turn is not an object"
        role, text = turn.get(role_key), turn.get(text_key)
        if not isinstance(role, str) or role not in roles:
            return None, "unknown role"
        if not isinstance(text, str):
            return None, "text is not a string"
        if not text.strip():
            if roles[role] == "system":
                continue  # an empty system prompt says nothing: leave it out rather than lose the row
            return None, "empty text"
        messages.append({"role": roles[role], "content": text})
    if not any(m["role"] == "assistant" for m in messages):
        return None, "no assistant turn"
    return messages, None


def tokenize_rows(batch, tokenizer, seq_len):
    """Batched Dataset.map: render and truncate each conversation; `problem` says why a row is unusable."""
    out = {"input_ids": [], "labels": [], "problem": []}
    for i in range(len(next(iter(batch.values())))):
        messages, problem = normalize_conversation({key: column[i] for key, column in batch.items()})
        input_ids, labels = render_conversation(tokenizer, messages) if messages else ([], [])
        input_ids, labels = input_ids[:seq_len], labels[:seq_len]
        if problem is None and all(label == IGNORE_INDEX for label in labels):
            problem = NO_TRAINED_TOKEN  # the prompt alone fills seq_len: the row would teach nothing
        out["input_ids"].append(input_ids)
        out["labels"].append(labels)
        out["problem"].append(problem or "")
    return out


def pack_rows(batch, seq_len):
    """Batched Dataset.map: concatenate consecutive conversations into rows of at most seq_len tokens.

    A conversation is never split across rows. The model predicts labels[t] from token t-1, so the first
    label of each conversation would be predicted from the previous conversation's last token: it is
    forced to IGNORE_INDEX (it is a prompt token anyway) so no label crosses a conversation boundary.
    Attention still crosses it: the model has no per-document mask."""
    packed = {"input_ids": [], "labels": []}
    for input_ids, labels in zip(batch["input_ids"], batch["labels"]):
        if not packed["input_ids"] or len(packed["input_ids"][-1]) + len(input_ids) > seq_len:
            packed["input_ids"].append([])
            packed["labels"].append([])
        packed["input_ids"][-1].extend(input_ids)
        packed["labels"][-1].extend([IGNORE_INDEX] + labels[1:])
    return packed


def load_conversations(data_file=None, dataset="teknium/OpenHermes-2.5"):
    """The raw rows of a local JSON/JSONL/Parquet file, or else of a hub dataset's train split."""
    import datasets
    if data_file is not None:
        if not os.path.isfile(data_file):
            raise PionError(f"data file not found: {data_file}")
        if os.path.getsize(data_file) == 0:
            raise PionError(f"{data_file} is empty")
        kind = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(os.path.splitext(data_file)[1].lower())
        if kind is None:
            raise PionError(f"{data_file}: expected a .json, .jsonl or .parquet file")
        source, kwargs = data_file, dict(path=kind, data_files=data_file)
        if data_file.lower().endswith(".jsonl"):
            check_jsonl_rows(data_file)
    else:
        source, kwargs = dataset, dict(path=dataset)
    try:
        return datasets.load_dataset(**kwargs, split="train")
    except Exception as e:  # offline, unknown name, unparsable file...: one line, not a traceback
        raise PionError(f"cannot load {source}: {first_line(e)}")


def check_jsonl_rows(path):
    """Refuse a bad JSONL line by its number (jsonl.py's rules: UTF-8, a JSON object, no lone surrogate) before
    datasets reads the file: its own errors do not say where, and some come as a traceback mid-tokenizing.
    datasets then parses the file again, as it alone can: into Arrow columns whose types unify all rows'."""
    for _ in jsonl_objects(path):
        pass


def load_sft_splits(tokenizer, seq_len, data_file=None, dataset="teknium/OpenHermes-2.5", pack=False,
                    max_samples=None, val_fraction=0.01, seed=42, num_proc=None):
    """-> (train_rows, val_rows), each a datasets.Dataset of {"input_ids": list[int], "labels": list[int]}.

    Rows are at most seq_len tokens and not padded: collate() pads a batch. Without pack a row is one
    conversation; with pack, several. Validation takes round(val_fraction * n) conversations (at least 1
    when val_fraction > 0), chosen with `seed`; max_samples takes a seeded sample of the raw rows first.
    Tokenization runs once through Dataset.map and is cached by datasets' fingerprints."""
    import datasets
    if not 0 <= val_fraction < 1:
        raise PionError(f"val_fraction must be in [0, 1), got {val_fraction}")
    raw = load_conversations(data_file, dataset)
    if max_samples is not None and max_samples < len(raw):
        raw = raw.shuffle(seed=seed).select(range(max_samples))
    if num_proc is None:  # worker start-up costs more than it saves on small data
        num_proc = min(8, os.cpu_count() or 1) if len(raw) >= 50_000 else None
    int32s = datasets.Sequence(datasets.Value("int32"))  # half the cache of int64: ids < 2**31
    features = datasets.Features({"input_ids": int32s, "labels": int32s, "problem": datasets.Value("string")})
    tokenized = raw.map(tokenize_rows, batched=True, fn_kwargs=dict(tokenizer=tokenizer, seq_len=seq_len),
                        remove_columns=raw.column_names, features=features, num_proc=num_proc, desc="tokenizing")
    problems = Counter(tokenized["problem"])
    kept = problems.pop("", 0)
    dropped = problems.pop(NO_TRAINED_TOKEN, 0)
    skipped = ", ".join(f"{n} {why}" for why, n in problems.most_common())
    print(f"sft data: {kept:,} conversations kept, {sum(problems.values()):,} skipped as malformed"
          f"{f' ({skipped})' if skipped else ''}, {dropped:,} dropped with no trained token within seq_len {seq_len}")
    n_val = max(1, round(val_fraction * kept)) if val_fraction > 0 else 0
    if kept <= n_val:
        raise PionError(f"{kept} usable conversation(s) in {data_file or dataset}: too few to train on "
                        f"and hold out {n_val} for validation")
    conversations = tokenized.filter(lambda problem: [not p for p in problem], batched=True,
                                     input_columns="problem", num_proc=num_proc).remove_columns("problem")
    if n_val:
        split = conversations.train_test_split(test_size=n_val, seed=seed)
        train, val = split["train"], split["test"]
    else:
        train, val = conversations, conversations.select([])
    if pack:
        train, val = (rows.map(pack_rows, batched=True, fn_kwargs=dict(seq_len=seq_len), num_proc=num_proc,
                               desc="packing") for rows in (train, val))
    held_out = f", {len(val):,} val rows" if val_fraction > 0 else " (no validation rows held out here)"
    print(f"sft data: {len(train):,} train rows{held_out}{' (packed)' if pack else ''}")
    return train, val


def collate(rows, pad_to=None):
    """rows -> {"input_ids": LongTensor (B, T), "labels": LongTensor (B, T)}, right-padded to pad_to or to
    the longest row. Padding is PAD_ID with IGNORE_INDEX labels; under causal attention the padding after a
    row never changes its real tokens. Pass pad_to=seq_len for fixed shapes (torch.compile recompiles per T)."""
    T = pad_to or max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), T), PAD_ID, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for b, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[b, :n] = torch.tensor(row["input_ids"])
        labels[b, :n] = torch.tensor(row["labels"])
    return {"input_ids": input_ids, "labels": labels}


def sft_batches(rows, batch_size, seed, start_step=0, pad_to=None):
    """Endless collated batches, each epoch in a fresh seeded order, the last partial batch dropped.
    Batch k depends only on (seed, k): resuming at start_step yields what an unbroken run would have."""
    steps_per_epoch = len(rows) // batch_size
    if steps_per_epoch == 0:
        raise PionError(f"{len(rows)} rows are fewer than one batch of {batch_size}")
    for epoch in itertools.count(start_step // steps_per_epoch):
        order = np.random.default_rng((seed, epoch)).permutation(len(rows))
        for step in range(max(0, start_step - epoch * steps_per_epoch), steps_per_epoch):
            yield collate([rows[int(i)] for i in order[step * batch_size:(step + 1) * batch_size]], pad_to)


# ----------------------------------------------------------------------------------------------------


def marked_text(tokenizer, input_ids, labels):
    """Decode a row with each trained span between « and », to check the mask by eye."""
    pieces = []
    for trained, run in itertools.groupby(zip(input_ids, labels), key=lambda pair: pair[1] != IGNORE_INDEX):
        text = tokenizer.decode([token for token, _ in run], skip_special_tokens=False)
        pieces.append(f"«{text}»" if trained else text)
    return "".join(pieces)


def main(argv=None):
    parser = ArgumentParser(description="Show how SFT data is rendered, masked and packed.")
    parser.add_argument("--data_file", help="local .json, .jsonl or .parquet file (ShareGPT or OpenAI rows)")
    parser.add_argument("--dataset", default="teknium/OpenHermes-2.5", help="hub dataset, when no --data_file")
    parser.add_argument("--tokenizer", help="tokenizer JSON (default: the Pion tokenizer)")
    parser.add_argument("--seq_len", type=positive_int, default=2048, help="tokens per row")
    parser.add_argument("--pack", action="store_true", help="pack several conversations into each row")
    parser.add_argument("--max_samples", type=positive_int, default=1000, help="conversations to sample")
    args = parser.parse_args(argv)
    tokenizer = load_tokenizer(args.tokenizer)
    rows, _ = load_sft_splits(tokenizer, args.seq_len, args.data_file, args.dataset, pack=args.pack,
                              max_samples=args.max_samples, val_fraction=0)
    print("--- first row; trained text between « and » ---")
    print(marked_text(tokenizer, rows[0]["input_ids"], rows[0]["labels"]))
    print("---")
    n_tokens = sum(len(labels) for labels in rows["labels"])
    n_trained = sum(label != IGNORE_INDEX for labels in rows["labels"] for label in labels)
    print(f"mask ratio: {n_trained:,} of {n_tokens:,} tokens trained ({n_trained / n_tokens:.1%}) "
          f"in {len(rows):,} rows")


if __name__ == "__main__":
    run_cli(main)
