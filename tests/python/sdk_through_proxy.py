"""Drives tallyfy-proxy with Tallyfy's official Python SDK, as a legacy app would.

Usage: sdk_through_proxy.py BASE_URL API_KEY ORG_ID
Prints one JSON object with what the SDK saw; exits non-zero on any failure.
"""

import json
import sys

from tallyfy import TallyfyError, TallyfySDK


def main() -> int:
    base_url, api_key, org_id = sys.argv[1:4]
    sdk = TallyfySDK(api_key=api_key, base_url=base_url, max_retries=0)
    orgs = sdk.organizations.get_current_user_organizations()
    tasks = sdk.tasks.get_my_tasks(org_id, per_page=5)
    runs = sdk.tasks.get_organization_runs(org_id, per_page=5)

    refused_status = None
    try:
        TallyfySDK(api_key="not-a-known-key", base_url=base_url, max_retries=0).tasks.get_my_tasks(org_id)
    except TallyfyError as error:
        refused_status = getattr(error, "status_code", None)

    print(json.dumps({
        "orgs": len(orgs.data),
        "tasks": len(tasks.data),
        "runs": len(runs.data),
        "refused_status": refused_status,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
