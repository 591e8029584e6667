# usage: testfixture cfollower.tcl DBFILE PORT OUTFILE
# The reference build's follower.tcl, plus a dump of what it ended with,
# written from the same process (a new process must recover the hctree
# logs a follower leaves, which crashes this build): OUTFILE gets
# "base CID HASH", "entry CID HASH" per journal row, "row A B C" per t1 row.
set dbf [lindex $argv 0]
set port [lindex $argv 1]
set outf [lindex $argv 2]
file delete -force $dbf
sqlite3 dbhdl file:$dbf?hctree=1 -uri 1
sqlite3_hct_journal_init dbhdl
dbhdl close
hct_testserver T $dbf
T configure -follower 1 -syncthreads 1 -port $port
set rc [catch {T run} msg]
puts "follower run rc=$rc [list $msg]"
sqlite3 db2 file:$dbf?hctree=1 -uri 1
set out [open $outf w]
db2 eval {SELECT cid, hex(hash) AS h FROM sqlite_hct_baseline} { puts $out "base $cid $h" }
db2 eval {SELECT cid, hex(hash) AS h FROM sqlite_hct_journal ORDER BY cid} { puts $out "entry $cid $h" }
db2 eval {SELECT a, hex(b) AS b, hex(c) AS c FROM t1 ORDER BY a} { puts $out "row $a $b $c" }
close $out
db2 close
exit $rc
