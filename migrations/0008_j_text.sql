-- stripe.j_text, cheaper (docs/benchmarks.md "History"): the same text for every JSON value, in two lookups
-- instead of a type test and one or two more. `->> 'id'` reads an object's id and is null for anything else (or an
-- object without an id, or with a null one); `#>> '{}'` reads a string as is, JSON null as null, and anything else
-- as its JSON text. Every typed text column is computed through it, on the applier's upsert and in history reads
-- (applier/tests/applier/robustness.rs checks each shape).
create or replace function stripe.j_text(j jsonb) returns text
language sql immutable parallel safe
return coalesce(j ->> 'id', j #>> '{}');
