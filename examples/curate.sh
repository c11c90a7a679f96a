#!/usr/bin/env bash
# The corpus pipeline on real data: WikiText-2, the alpaca-gpt4 demo set and tinyshakespeare, with
# planted exact and near duplicates, non-English documents and GSM8K test questions, through
# quality + language filters, decontamination, exact + MinHash dedup, tokenizer and shards.
# Prints the report; the whole of it is in data/curated/report.json, the dropped documents with
# their reasons in data/curated/rejects.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
DATA=${SHARED_DATA:-../shared/data}
SRC=data/curate-src
rm -rf "$SRC" && mkdir -p "$SRC"
python - "$DATA" "$SRC" <<'PY'
"""Collect the sources as JSONL documents ({"id", "text"}) and plant what the pipeline must catch."""
import gzip, json, random, sys
from pathlib import Path

data, src = Path(sys.argv[1]), Path(sys.argv[2])
rng = random.Random(0)

def write(name, docs):
    with open(src / name, "w", encoding="utf-8") as f:
        for i, text in enumerate(docs):
            f.write(json.dumps({"id": f"{name.split('.')[0]}-{i}", "text": text}, ensure_ascii=False) + "\n")

wiki = [line.strip() for line in gzip.open(data / "wikitext-2/train.txt.gz", "rt", encoding="utf-8") if line.strip()]
write("wikitext2.jsonl", wiki)  # one paragraph (or heading) per document
alpaca = json.loads((data / "alpaca/alpaca_gpt4_en_demo.json").read_text())
write("alpaca.jsonl", ["\n\n".join(x for x in (r["instruction"], r.get("input", ""), r["output"]) if x) for r in alpaca])
write("shakespeare.jsonl", (data / "tinyshakespeare/input.txt").read_text().split("\n\n"))  # one speech each

long = [p for p in wiki if len(p.split()) > 80]
exact = [rng.choice(long) for _ in range(100)]
exact = ["  " + p.upper() if i % 2 else p.replace(" , ", ", ") for i, p in enumerate(exact)]  # case, spacing
near = []
for p in rng.sample(long, 100):
    words = p.split()
    # change 1% of the words: each changed word breaks up to 5 of the 5-word shingles, so Jaccard ~0.9
    for k in rng.sample(range(len(words)), max(1, len(words) // 100)):
        words[k] = "changed"
    near.append(" ".join(words))
questions = [json.loads(line)["question"] for line in (data / "gsm8k/test.jsonl").read_text().splitlines()[:20]]
leaked = [f"{rng.choice(long)} {q} {rng.choice(long)}" for q in questions]
foreign = [
    "Die Stadt liegt am Ufer eines großen Flusses und ist seit dem Mittelalter ein wichtiger Handelsplatz. "
    "Ihre Altstadt mit den engen Gassen, den Fachwerkhäusern und dem gotischen Dom zieht jedes Jahr viele "
    "Besucher an, die auch die Museen und die zahlreichen Cafés am Marktplatz schätzen.",
    "La ville est située au bord d'un grand fleuve et elle est depuis le Moyen Âge un important lieu de "
    "commerce. Sa vieille ville, avec ses ruelles étroites, ses maisons à colombages et sa cathédrale "
    "gothique, attire chaque année de nombreux visiteurs qui apprécient aussi ses musées et ses cafés.",
    "La ciudad está situada a orillas de un gran río y desde la Edad Media es un importante centro de "
    "comercio. Su casco antiguo, con calles estrechas, casas de entramado y una catedral gótica, atrae "
    "cada año a muchos visitantes que también disfrutan de sus museos y de los cafés de la plaza mayor.",
    "La città si trova sulla riva di un grande fiume ed è fin dal Medioevo un importante centro di commercio. "
    "Il suo centro storico, con le strade strette, le case a graticcio e la cattedrale gotica, attira ogni "
    "anno molti visitatori che apprezzano anche i musei e i caffè della piazza del mercato.",
]
write("planted.jsonl", exact + near + leaked + foreign)
print(f"collected: wikitext2 {len(wiki)}, alpaca {len(alpaca)}, shakespeare docs; planted {len(exact)} exact, "
      f"{len(near)} near duplicates, {len(leaked)} GSM8K test questions, {len(foreign)} non-English documents")
PY
temper prepare --config configs/curate-prepare.yaml --input "$SRC" --out data/curated \
  --decontaminate.files="[$DATA/gsm8k/test.jsonl]"
python -c "import json; r = json.load(open('data/curated/report.json')); print(json.dumps(r['stages'], indent=1)); print('languages', r['languages'])"
