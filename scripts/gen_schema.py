#!/usr/bin/env python3
"""Generates the object tables of schema `stripe` from the registry and Stripe's example objects.

Usage: scripts/gen_schema.py NNNN_name   -> writes migrations/NNNN_name.sql with a `create table` for every
registry table that no earlier migration creates (migrations are never edited once applied).

Typed columns are plain columns that the applier fills from the object's JSON in its upsert, by column type,
through the stripe.j_* functions (migrations/0001), so they never fail an insert (migrations/0005 explains why
they are not generated columns). A column's type comes from every example of the object type found anywhere in
testdata/stripe (fixtures3.json and the peer events, nested objects included):
  string -> text, integer -> bigint, float -> numeric, boolean -> boolean, object/array -> jsonb,
  string or object (an expandable field) -> text (the id), only ever null -> text, other mixes -> jsonb.
"""
import glob
import json
import os
import re
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXED = ["id", "object", "livemode", "deleted"]  # kept in fixed columns, or meaningless per table


def examples():
    """Every dict with an `object` and an `id` (or no id: balance) found in the test data, by object type."""
    found = {}
    sources = [json.load(open(os.path.join(ROOT, "testdata/stripe/fixtures3.json")))["resources"]]
    for path in sorted(glob.glob(os.path.join(ROOT, "testdata/stripe/peer-events/*.json"))):
        sources.append(json.load(open(path))["data"])

    def walk(value):
        if isinstance(value, dict):
            kind = value.get("object")
            if isinstance(kind, str) and kind not in ("list", "event") and value.get("deleted") is not True:
                found.setdefault(kind, []).append(value)
            for child in value.values():
                walk(child)
        elif isinstance(value, list):
            for child in value:
                walk(child)

    for source in sources:
        walk(source)
    return found


def json_kind(value):
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (dict, list)):
        return "json"
    return None


def column_type(kinds):
    kinds = set(kinds) - {None}
    if not kinds or kinds == {"string"} or kinds == {"string", "json"}:
        return "text"
    if kinds == {"integer"}:
        return "bigint"
    if kinds <= {"integer", "float"}:
        return "numeric"
    if kinds == {"boolean"}:
        return "boolean"
    return "jsonb"




def is_list(value):
    return isinstance(value, dict) and value.get("object") == "list"


def columns_of(samples):
    """Typed columns of an object type. Embedded lists (`{"object": "list"}`) get none: they are child tables, and a
    jsonb copy would double the bytes written for the biggest objects (migrations/0004)."""
    fields = {}
    lists = set()
    for sample in samples:
        for field, value in sample.items():
            fields.setdefault(field, []).append(json_kind(value))
            if is_list(value):
                lists.add(field)
    return {f: column_type(k) for f, k in sorted(fields.items()) if f not in FIXED and f not in lists}


def quote_ident(name):
    return '"' + name.replace('"', '""') + '"'


def create_table(entry, samples):
    table = entry["table"]
    owned = any(e.get("owned") for e in entry.get("embedded_in", []))
    lines = ["    _account_id text not null", "    id text not null"]
    if owned:
        lines.append("    _parent_id text")
    for field, kind in columns_of(samples).items():
        lines.append(f"    {quote_ident(field)} {kind}")
    lines += [
        "    livemode boolean",
        "    deleted boolean not null default false",
        "    _raw_data jsonb not null",
        "    _last_event_id text",
        "    _last_event_created bigint not null",
        "    _last_event_seq bigint not null",
        "    _updated_at timestamptz not null default now()",
        "    primary key (_account_id, id)",
    ]
    sql = f"-- Stripe object `{entry['type']}`\ncreate table stripe.{quote_ident(table)} (\n" + ",\n".join(lines) + "\n);\n"
    if owned:
        sql += f"create index {table}_parent_idx on stripe.{quote_ident(table)} (_account_id, _parent_id);\n"
    return sql


def already_created(exclude):
    tables = set()
    for path in glob.glob(os.path.join(ROOT, "migrations/*.sql")):
        if os.path.basename(path) == exclude:
            continue
        tables |= set(re.findall(r'create table stripe\."?([a-z0-9_]+)"?', open(path).read()))
    return tables


def main():
    if len(sys.argv) != 2 or not re.fullmatch(r"\d{4}_[a-z0-9_]+", sys.argv[1]):
        sys.exit(__doc__)
    name = sys.argv[1] + ".sql"
    registry = tomllib.load(open(os.path.join(ROOT, "applier/registry.toml"), "rb"))
    found = examples()
    done = already_created(name)
    parts = [f"-- Generated by scripts/gen_schema.py from applier/registry.toml and testdata/stripe. Do not edit.\n"]
    for entry in registry["object"]:
        if entry["table"] in done:
            continue
        samples = found.get(entry["type"], [])
        if not samples:
            print(f"warning: no example of {entry['type']}: only fixed columns", file=sys.stderr)
        parts.append(create_table(entry, samples))
    if len(parts) == 1:
        sys.exit("nothing to generate: every registry table already exists in a migration")
    parts.append("-- lz4 compression on the new columns where the server supports it (migrations/0004).\nselect stripe.use_lz4();\n")
    with open(os.path.join(ROOT, "migrations", name), "w") as out:
        out.write("\n".join(parts))
    print(f"wrote migrations/{name} ({len(parts) - 1} tables)")


if __name__ == "__main__":
    main()
