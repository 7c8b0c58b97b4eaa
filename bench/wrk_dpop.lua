-- wrk script for the full-pipeline target: every request carries the DPoP-bound access token and
-- its own fresh DPoP proof, read from the file named by WRK_DPOP_PROOFS (one per line; made by
-- bench/dpop_load.py before the run). When the proofs run out wrk keeps sending the last one,
-- which the sidecar refuses as a replay (counted as non-2xx): size the file to the run.
local proofs = {}
local token = os.getenv("WRK_DPOP_TOKEN")
for line in io.lines(os.getenv("WRK_DPOP_PROOFS")) do proofs[#proofs + 1] = line end
local i = 0
request = function()
  i = i + 1
  if i > #proofs then i = #proofs end
  return wrk.format("GET", "/", {["Authorization"] = "DPoP " .. token, ["DPoP"] = proofs[i]})
end
dofile(os.getenv("WRK_REPORT_LUA"))
