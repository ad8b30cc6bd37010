"""The exceptions reftgraph raises, one small hierarchy.

>>> import reftgraph as rg
>>> try:
...     rg.Site("resid_post", layer=0, head=1)
... except rg.ReftgraphError as e:
...     print(type(e).__name__, "|", e)
SiteError | resid_post has no heads; head= is only for head_out, q, k, v, attn_pattern, q_in, k_in, v_in

Every error is a :class:`ReftgraphError` and a ``ValueError`` (as before the hierarchy),
so ``except ValueError`` keeps working:

- :class:`SiteError`: a node, site, graph or input that does not fit the model;
- :class:`GraphFileError`: a saved graph folder that cannot be read or does not fit;
- :class:`DictionaryFileError`: a sparse-autoencoder folder that cannot be read or run exactly;
- :class:`DataError`: data, prompts or a metric a method cannot use;
- :class:`SpecError`: a training spec file with a bad field;
- :class:`RemoteError`: a remote call (NDIF) that cannot be made;
- :class:`ModelNotFound`: a model name or path that nothing can be loaded from (also an ``OSError``).

All of them are raised before any forward pass.
"""


class ReftgraphError(ValueError):
    """The base of every reftgraph error.

    >>> issubclass(SiteError, ReftgraphError) and issubclass(SpecError, ReftgraphError)
    True
    """


class SiteError(ReftgraphError):
    """A node, site or input that does not fit the model; raised before any forward pass.

    >>> import reftgraph as rg
    >>> rg.Site("resid_post", layer=0, head=1)
    Traceback (most recent call last):
    ...
    reftgraph.errors.SiteError: resid_post has no heads; head= is only for head_out, q, k, v, attn_pattern, q_in, k_in, v_in
    """


class GraphFileError(ReftgraphError):
    """A saved graph (graph.json + weights.safetensors) that is missing, damaged or does not
    fit the model it is loaded for.

    >>> import reftgraph as rg
    >>> rg.load_graph("/no/such/graph")          # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    reftgraph.errors.GraphFileError: ...
    """


class DictionaryFileError(ReftgraphError):
    """A dictionary (SAE) folder that is in no format reftgraph reads, is damaged, or holds
    a dictionary reftgraph cannot run exactly (the message says which).

    >>> import reftgraph as rg
    >>> rg.features.load("/no/such/sae")
    Traceback (most recent call last):
    ...
    reftgraph.errors.DictionaryFileError: no dictionary at /no/such/sae: it does not exist
    """


class DataError(ReftgraphError):
    """Data, prompts or a metric that a method cannot use (e.g. an empty prompt list).

    >>> import reftgraph as rg
    >>> rg.Graph().run(rg.models.tiny("llama"), [])   # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    reftgraph.errors.DataError: prompts must be a non-empty list of strings, got list (empty)
    """


class SpecError(ReftgraphError):
    """A training spec (JSON) with a missing, unknown or invalid field; the message names it.

    >>> from reftgraph.cli.spec import read_spec
    >>> read_spec("/no/such/spec.json")
    Traceback (most recent call last):
    ...
    reftgraph.errors.SpecError: spec file not found: /no/such/spec.json
    """


class RemoteError(ReftgraphError):
    """A remote call (NDIF through nnsight) that cannot be made: no Hugging Face id for the
    model, no API key, a server that does not answer; raised before anything is sent.

    >>> import reftgraph as rg
    >>> rg.Graph().run(rg.models.tiny("llama"), ["ab"], remote=True)    # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    reftgraph.errors.RemoteError: remote execution on NDIF needs the model's Hugging Face id; ...
    """


class ModelNotFound(ReftgraphError, OSError):
    """A model name or path that no model can be loaded from: not a folder, not an offline
    model, and not a Hugging Face id that the Hub (or the local Hugging Face cache) provides.

    >>> import reftgraph as rg
    >>> try:
    ...     rg.load("/no/such/model")
    ... except ModelNotFound as e:
    ...     print(e)
    model '/no/such/model' does not exist (not a folder here, and not a Hugging Face id)

    It is a :class:`ReftgraphError` (a ``ValueError``) and an ``OSError`` (what the loaders
    raised before it), so either ``except`` clause catches it.
    """
