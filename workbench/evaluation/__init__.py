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
  - ``entity_adj`` / ``relation_adj`` / ``request_adj`` / ``transfer_adj``: the same
    reliability and generality **bleed-adjusted** (below);
  - ``other_relations``: the subject's facts of *other* relations (all the dataset has by
    default, both request phrasings): ``other_relations_bleed`` = share now answering o*,
    ``other_relations_locality`` = share keeping their own object. Bleed looks along the
    relation, these along the subject: an edit that rewrites the subject as a whole shows here;
  - ``locality``: the fact's neighbourhood prompts keep their own answers.

**Bleed-adjusted transfer.** A relation-keyed edit can make a transfer prompt answer o* because
it rewrote the prompt's words for every subject of the relation, not because it changed this
subject's fact. Each family prompt therefore has *matched controls*: the same prompt with each
bleed subject in the subject's place (every phrasing, not only the request's). For a prompt
``p`` of the fact's subject ``s`` and its controls ``p(s')``::

    adjusted(p) = [p answers o*] - mean over s' of [p(s') answers o*]

and a family's adjusted reliability / generality are the means over its first / other prompts
(prompts with no control are left out), in each variant (for ``_score``: P(o*) > P(o) for the
subject minus P(o*) > P(own object) for the controls). For one random control ``s'`` this is
P(s answers o*, s' does not) - P(s' answers o*, s does not): the net rate at which the edited
model tells the edited subject from another subject of the relation *in the same words*. It
equals transfer when no control moves, is 0 when the edit moves every subject alike (a rewrite
of the phrasing, whatever the raw transfer), and is negative when controls move more often than
the subject; so it lies in [-100, 100] %. It is not a probability, and it assumes the controls
are exchangeable with the subject (they are other subjects of the same relation whose objects
are neither o nor o*).

Every metric comes in three variants (the suffix says which), as fractions per row and in
percent in the summaries (the ``*_adj`` families are differences of two such rates):

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
from .run import (ID_FIELDS, PROBES_VERSION, ROWS_FILE, STORE_KIND, cells_for, evaluate, evaluate_one, evaluation_key,
                  probe_bank_version, select_facts)
from .scoring import ADJUSTED, METRICS, VARIANTS, score_fact, score_probes
from .statistics import CELL, bootstrap_ci, summarize
from .tables import (ADJUSTED_COLUMNS, CUBE_COLUMNS, PAPER_COLUMNS, SPECIFICITY_COLUMNS, VARIANT_TEXT, cube_table,
                     full_table, paper_table, to_markdown, write_tables)

__all__ = ["ADJUSTED", "ADJUSTED_COLUMNS", "BASELINE", "BATCH_METHODS", "CELL", "CUBE_COLUMNS", "ID_FIELDS", "METHODS", "METHOD_LABELS", "METRICS",
           "PAPER_COLUMNS", "PAPER_ORDER", "PROBES_VERSION", "ROWS_FILE", "SPECIFICITY_COLUMNS", "STORE_KIND", "VARIANTS", "VARIANT_TEXT", "ObjectScore",
           "bootstrap_ci", "cells_for", "cube_table", "default_methods", "evaluate", "evaluate_one",
           "evaluation_key", "full_table", "make_edit", "paper_table", "preset_name", "probe_bank_version", "probes",
           "register_method", "relation_templates", "resolve_method", "resolved_hparams", "score_fact",
           "score_objects", "score_probes", "select_facts", "summarize", "to_markdown", "with_shared_stats",
           "write_tables"]
