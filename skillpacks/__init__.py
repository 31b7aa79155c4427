"""The SkillPack format and builder: delta extraction, compression, read/verify, CLI."""
