"""Which embedded model makes the better default persona encoder: all-MiniLM-L6-v2 or SmolLM2-135M?

For each candidate (frozen, with its default pooling) it embeds the bundled seed queries (312, tagged
with 12 situations), fits a softmax-regression probe for the situation on a fixed 70/30 split
(the routing signal a router must separate), and times encoding a batch of 8 queries.

    python benchmarks/encoder_choice.py --json docs/results/encoder_choice.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from personafuse import embedded  # noqa: E402
from personafuse.data.sources import seed_queries  # noqa: E402
from personafuse.moe.router import PersonaEncoder  # noqa: E402


@torch.no_grad()
def embed(spec: str, texts: list[str], batch: int = 16) -> tuple[torch.Tensor, float, str, int]:
    src = embedded.resolve(spec)
    backbone = embedded.load_backbone(src).eval()
    tok = embedded.load_tokenizer(src)
    enc = PersonaEncoder(backbone, embed_dim=8)  # projection unused: we probe the pooled states
    out = []
    for i in range(0, len(texts), batch):
        b = tok(texts[i : i + batch], padding=True, truncation=True, max_length=256, return_tensors="pt")
        h = backbone(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        out.append(enc.pool(h, b["attention_mask"]))
    times = []
    for _ in range(5):
        b = tok(texts[:8], padding=True, truncation=True, max_length=256, return_tensors="pt")
        t = time.perf_counter()
        backbone(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        times.append(time.perf_counter() - t)
    n_params = sum(p.numel() for p in backbone.parameters())
    return torch.cat(out).float(), statistics.median(times), enc.pooling, n_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    qs = seed_queries()
    texts = [q.text for q in qs]
    labels = [q.situation for q in qs]
    idx_train, idx_test = train_test_split(list(range(len(texts))), test_size=0.3, random_state=0, stratify=labels)
    results = {}
    for name, spec in (("all-MiniLM-L6-v2", "minilm"), ("SmolLM2-135M", "smollm2")):
        x, latency, pooling, n = embed(spec, texts)
        x = torch.nn.functional.normalize(x, dim=-1).numpy()
        scaler = StandardScaler().fit(x[idx_train])
        probe = LogisticRegression(max_iter=2000, C=1.0).fit(scaler.transform(x[idx_train]), [labels[i] for i in idx_train])
        acc = probe.score(scaler.transform(x[idx_test]), [labels[i] for i in idx_test])
        results[name] = {"situation_probe_accuracy": acc, "encode_batch8_seconds": latency, "pooling": pooling, "parameters_m": n / 1e6}
        print(f"{name:<18} pooling={pooling:<5} params={n / 1e6:6.1f}M  probe accuracy {acc:.3f}  encode 8 queries {latency * 1000:.0f} ms", flush=True)
    out = {"results": results, "setup": {"queries": len(texts), "situations": len(set(labels)), "split": "70/30 stratified, seed 0",
                                         "threads": torch.get_num_threads(), "torch": torch.__version__}}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
