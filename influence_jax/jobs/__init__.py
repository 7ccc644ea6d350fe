"""What the absl command-line jobs in scripts/ do: configs, stages, resumption, reports."""
