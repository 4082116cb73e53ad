"""The CopiaFacts job file: syntax, the parsed job, $domain_limit rules,
outcomes and retries, attempt records, the MIME message."""
