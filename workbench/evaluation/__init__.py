"""Evaluating edits from both request perspectives: probe families, bleed, intervals, the paper's tables.

The protocol (reference §7) separates three things, and every row and table names each:

* **request perspective** -- how the edit is posed: ``"entity"`` = the fact phrased
  subject-first, ``"relation"`` = phrased relation-first (:mod:`workbench.perspective`).
  Every method receives that request (a fact carrying no other prompt), FT and KN included.
* **key locus** -- where token-keyed methods (ROME, MEMIT, KN's attribution; FT with
  ``positions="locus"``) read their key: ``"subject"`` (last subject token), ``"relation"``
  (last relation token), ``"relation_before_subject"`` (last relation token before the
  subject). The paper's pairing, :data:`~workbench.perspective.DEFAULT_LOCUS`, is entity <->
  subject and relation <-> relation; ``loci=`` gives any other pairing (the full cube).
* **probe families** scored on the edited model, per fact:

  - ``entity`` / ``relation``: the entity-phrased and relation-phrased families (the paper's
    "Entity Knowledge" and "Relation Knowledge" columns). Each family's first prompt is its
    perspective's request, so *reliability* of the request's own family is the edit prompt
    itself and *generality* the family's other phrasings;
  - ``request`` / ``transfer``: the same numbers seen from the request: the request family's
    reliability and generality, and the other family's (*transfer*) reliability and generality;
  - ``bleed``: other subjects of the relation (``bleed_subjects`` of them, both request
    phrasings) that now predict o*. An edit keyed where every subject of the relation
    passes changes them all; high transfer with high bleed is not specific knowledge;
  - ``locality``: the fact's neighbourhood prompts keep their own answers.

Every metric comes in three variants (the suffix says which), as fractions per row and in
percent in the summaries:

* ``_acc``: teacher-forced accuracy, all tokens: the prompt followed by the object's tokens
  but the last; correct only if the argmax is the object's token at *every* object position;
* ``_tok``: teacher-forced per-token accuracy, the mean over the object's tokens (EasyEdit's
  definition);
* ``_score``: CounterFact's score, P(o*) > P(o) by mean token log-probability; for bleed
  P(o*) > P(that subject's own object); for locality P(answer) > P(o*) (a neighbour whose
  answer *is* o* has no such comparison and is left out of the score, not of the accuracy).

Per fact, generality, bleed and locality are means over that fact's prompts; a cell (method,
request, locus) reports the mean over facts with its number of edits ``n`` and a 95%
percentile-bootstrap interval over facts (:func:`bootstrap_ci`). An edit that fails (an
error, or a KN calibration that finds no λ) is recorded as failed: counted in the cell's
``failed`` column and left out of its means. The *unedited* rows score the unedited model on
each perspective's probes with the same targets (how often o* is already there).

One edit's work is the pure function :func:`evaluate_one` (model, fact, method, request,
locus, probes -> row dict); :func:`evaluate` is the loop around it.

The package's modules, in the order of the method:

* :mod:`.methods` -- the method registry, each method's preset name and resolved hyperparameters;
* :mod:`.scoring` -- the metrics of one fact's probes on the model as it is now;
* :mod:`.run` -- one edit (:func:`evaluate_one`) and the run over the protocol cube with its store;
* :mod:`.statistics` -- per-cell means and bootstrap intervals;
* :mod:`.tables` -- the paper's tables, the cube, Markdown and files.
"""

from ..perspective import probes, relation_templates
from ..predict import ObjectScore, score_objects
from .methods import (BASELINE, BATCH_METHODS, METHOD_LABELS, METHODS, PAPER_ORDER, default_methods, make_edit,
                      preset_name, register_method, resolve_method, resolved_hparams, with_shared_stats)
from .run import (ID_FIELDS, ROWS_FILE, STORE_KIND, cells_for, evaluate, evaluate_one, evaluation_key,
                  probe_bank_version, select_facts)
from .scoring import METRICS, VARIANTS, score_fact, score_probes
from .statistics import CELL, bootstrap_ci, summarize
from .tables import CUBE_COLUMNS, PAPER_COLUMNS, VARIANT_TEXT, cube_table, full_table, paper_table, to_markdown, write_tables

__all__ = ["BASELINE", "BATCH_METHODS", "CELL", "CUBE_COLUMNS", "ID_FIELDS", "METHODS", "METHOD_LABELS", "METRICS",
           "PAPER_COLUMNS", "PAPER_ORDER", "ROWS_FILE", "STORE_KIND", "VARIANTS", "VARIANT_TEXT", "ObjectScore",
           "bootstrap_ci", "cells_for", "cube_table", "default_methods", "evaluate", "evaluate_one",
           "evaluation_key", "full_table", "make_edit", "paper_table", "preset_name", "probe_bank_version", "probes",
           "register_method", "relation_templates", "resolve_method", "resolved_hparams", "score_fact",
           "score_objects", "score_probes", "select_facts", "summarize", "to_markdown", "with_shared_stats",
           "write_tables"]
