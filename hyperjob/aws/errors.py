"""One error type for the cluster verbs, and one line for each AWS failure a user can act on.

Why: botocore's ClientError prints as "An error occurred (AccessDeniedException) when calling the CreateCluster
operation: User: arn:... is not authorized to perform: sagemaker:CreateCluster on resource: ...". The user needs the
action that was refused and what to do; the CLI prints `str(AwsError)` as one line and exits non-zero.
"""

from __future__ import annotations

from typing import Any

ACCESS_DENIED = frozenset({"AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "AuthFailure"})
NO_CREDENTIALS_HINT = "configure credentials (aws configure, AWS_PROFILE or environment variables) and a region"


class AwsError(Exception):
    """An AWS call failed in a way the user can act on; the message is one line."""


def explain(error: Any, action: str) -> AwsError:
    """A botocore ClientError (or credential / endpoint error) as one line naming `action` (sagemaker:CreateCluster).

    Duck-typed on `error.response` so this module imports no botocore (the light verbs never import it).
    """
    response = getattr(error, "response", None)
    if not isinstance(response, dict):
        name = type(error).__name__
        if name in ("NoCredentialsError", "PartialCredentialsError", "NoRegionError"):
            return AwsError(f"{action}: {error}; {NO_CREDENTIALS_HINT}")
        return AwsError(f"{action}: {name}: {error}")
    info = response.get("Error", {})
    code = str(info.get("Code", "Unknown"))
    message = str(info.get("Message", "")).strip()
    if code in ACCESS_DENIED:
        return AwsError(f"not allowed to call {action} ({code}): grant it to the identity you use ({message})")
    return AwsError(f"{action} failed ({code}): {message}" if message else f"{action} failed ({code})")
