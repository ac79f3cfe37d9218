"""The Lightning integration: callbacks, batch adapters, the example module and DataModules, and
the ``warmstart`` command line. Built on :mod:`warmstart.engine`, never re-implementing it."""
