"""What people read: the evaluation report, model cards and plots."""
