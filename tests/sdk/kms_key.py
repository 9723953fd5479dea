"""A key in a local AWS KMS (moto's server), managed with boto3 as a customer would.

argv: endpoint, then `create` (prints "ok <key id>"), or `disable KEY_ID` / `enable KEY_ID`
(prints "ok disabled" / "ok enabled").
"""
import sys

import boto3

endpoint, command = sys.argv[1], sys.argv[2]
kms = boto3.client(
    "kms",
    endpoint_url=endpoint,
    region_name="us-east-1",
    aws_access_key_id="testing",
    aws_secret_access_key="testing",
)
if command == "create":
    print("ok " + kms.create_key(Description="aigateway tenant key")["KeyMetadata"]["KeyId"])
elif command == "disable":
    kms.disable_key(KeyId=sys.argv[3])
    print("ok disabled")
elif command == "enable":
    kms.enable_key(KeyId=sys.argv[3])
    print("ok enabled")
else:
    raise SystemExit(f"unknown command {command}")
