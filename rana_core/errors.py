"""User-facing errors: anything raised as a RanaError is shown as one line, never a traceback."""


class RanaError(ValueError):
    """Bad input or a missing asset: a message a user can act on."""


class ModelNotFound(RanaError):
    pass


class CorpusError(RanaError):
    pass


class BudgetError(RanaError):
    pass
