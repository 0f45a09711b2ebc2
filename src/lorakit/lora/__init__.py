"""The internal form of a LoRA: adapter kinds and their exact algebra, patches on native targets, the shared
alias transforms, linear algebra on factors and input checks."""
