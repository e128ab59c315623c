"""The application: the controller's passes, the loop that drives them,
the applier and the server preparer, doctor, and the CLI."""
