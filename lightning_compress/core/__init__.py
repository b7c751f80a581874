"""Pure-torch core: selection, importance, schedules and masks. Never imports lightning."""
