"""Static CSS/JS inlined into the review report and the run dashboard (see ``runner.report``)."""
