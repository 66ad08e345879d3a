"""Layer 11: the course. Build-it-yourself exercises with automatic checks (`exercises`, `checks`), claims that tie a
notebook's sentences to the numbers they quote (`claims`), measured runtimes (`runtimes`), and the student and
instructor versions, answer key and course tables (`versions`, run by `labkit course build`)."""
