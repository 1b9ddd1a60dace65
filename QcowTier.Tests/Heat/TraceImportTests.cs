using CsCheck;
using static QcowTier.Tests.Heat.HeatTestKit;

namespace QcowTier.Tests.Heat;

/// <summary>Every text importer on hand-written samples in the formats' real shapes, with damaged lines mixed in.</summary>
public sealed class TraceImportTests
{
    private const string BlkA = "0x5600000a0000";
    private const string BlkProbe = "0x5600000c0000";

    private static readonly string QemuLog = Lines(
        $"blk_co_preadv blk {BlkProbe} bs 0x5600000d0000 offset 0 bytes 512 flags 0x0",
        $"blk_co_pwritev blk {BlkA} bs 0x5600000b0000 offset 0 bytes 65536 flags 0x0",
        $"blk_co_preadv blk {BlkA} bs 0x5600000b0000 offset 0 bytes 4096 flags 0x0",
        "blk_root_attach child 0x5600000e0000 blk 0x5600000a0000 bs 0x5600000b0000",
        $"blk_co_preadv blk {BlkA} bs 0x5600000b0000 offset 8192 bytes 8192 flags 0x0",
        $"blk_co_preadv blk {BlkA} bs 0x5600000b0000 offset zz bytes 4096 flags 0x0",
        "%%% not a trace line",
        "",
        $"blk_co_pwritev blk {BlkA} bs 0x5600000b0000 offset 4194304 bytes 4096 flags 0x0",
        $"blk_co_pwritev blk {BlkA} bs 0x5600000b0000 offset 4190208 bytes 8192 flags 0x0");

    [Fact]
    public void Qemu_log_imports_the_busiest_backend_and_quotes_damaged_lines()
    {
        var map = NewMap();
        var r = Import(QemuLog, HeatTraceFormat.QemuTrace, map);

        r.LinesRead.Should().Be(10);
        r.ImportedBackend.Should().Be(BlkA);
        r.Backends.Should().Equal(
            new HeatTraceBackend(BlkA, 2, 3, true),
            new HeatTraceBackend(BlkProbe, 1, 0, false));
        r.IosImported.Should().Be(4, "two reads and two writes of the busiest backend lie on the disk");
        r.ReadsImported.Should().Be(2);
        r.WritesImported.Should().Be(2);
        r.IosOutsideDisk.Should().Be(1, "the write at 4 MiB starts at the end of the 4 MiB disk");
        r.IosClipped.Should().Be(1, "the write at 4 MiB - 4 KiB runs 4 KiB past the end");
        r.IosOfOtherDevices.Should().Be(1, "the format probe's read");
        r.MalformedLines.Should().Be(2);
        r.MalformedSamples.Select(s => s.Line).Should().Equal(6, 7);
        r.MalformedSamples[0].Text.Should().Contain("offset zz");
        r.MalformedSamples[0].Reason.Should().Contain("offset");
        r.LinesIgnored.Should().Be(2, "the other event and the empty line");

        map.GetUnit(0).Should().Be(new HeatUnit(0, 4096, 1, 1, 2));
        map.GetUnit(1).Should().Be(new HeatUnit(4096, 4096, 0, 1, 1));
        map.GetUnit(2).Reads.Should().Be(1);
        map.GetUnit(3).Reads.Should().Be(1);
        map.GetUnit(15).Writes.Should().Be(1, "the 64 KiB write covers units 0 to 15");
        map.GetUnit(16).Writes.Should().Be(0);
        map.GetUnit(1023).Writes.Should().Be(1, "the clipped write still heats the last unit");
        map.TotalReads.Should().Be(2);
        map.TotalWrites.Should().Be(2);
        map.WindowStart.Should().Be(T0, "an untimed trace happens at TraceStart");
    }

    [Fact]
    public void Qemu_log_imports_a_named_backend()
    {
        var map = NewMap();
        var r = Import(QemuLog, HeatTraceFormat.QemuTrace, map, new HeatImportOptions { Device = BlkProbe, TraceStart = T0 });
        r.ImportedBackend.Should().Be(BlkProbe);
        r.IosImported.Should().Be(1);
        r.IosOfOtherDevices.Should().Be(5);
        map.GetUnit(0).Should().Be(new HeatUnit(0, 4096, 1, 0, 1));
        map.TotalReadBytes.Should().Be(512);
    }

    [Fact]
    public void Qemu_log_with_timestamps_keeps_the_trace_clock()
    {
        var map = NewMap();
        var r = Import(Lines(
            "12345@1700000000.000001:blk_co_pwritev blk 0x1 bs 0x2 offset 4096 bytes 4096 flags 0x0",
            "12345@1700000010.500000: blk_co_preadv blk 0x1 bs 0x2 offset 4096 bytes 4096 flags 0x0",
            "12345@17000x0010.5:blk_co_preadv blk 0x1 bs 0x2 offset 4096 bytes 4096 flags 0x0",
            "12345@1700000011.000000:qemu_vfio_dma_map s 0x0 host 0x0 size 4096"), HeatTraceFormat.QemuTrace, map);

        var first = DateTimeOffset.FromUnixTimeSeconds(1_700_000_000).AddTicks(10);
        r.FirstIo.Should().Be(first);
        r.LastIo.Should().Be(first.AddTicks(10 * TimeSpan.TicksPerSecond + 4_999_990));
        map.WindowStart.Should().Be(r.FirstIo);
        map.WindowEnd.Should().Be(r.LastIo);
        map.GetUnit(1).Should().Be(new HeatUnit(4096, 4096, 1, 1, 2));
        r.MalformedLines.Should().Be(1);
        r.MalformedSamples.Single().Line.Should().Be(3);
        r.LinesIgnored.Should().Be(1);
    }

    private static readonly string Blkparse = Lines(
        "  8,0    1        1     0.000000000  4162  Q  WS 2048 + 8 [jbd2/sda1-8]",
        "  8,0    1        2     0.000002000  4162  G  WS 2048 + 8 [jbd2/sda1-8]",
        "  8,0    1        3     0.000003000  4162  I  WS 2048 + 8 [jbd2/sda1-8]",
        "  8,0    1        4     0.000004000  4162  D  WS 2048 + 8 [jbd2/sda1-8]",
        "  8,0    1        5     0.000188218     0  C  WS 2048 + 8 [0]",
        "  8,0    0        6     0.001000000  2713  Q   R 16 + 16 [cat]",
        "  8,0    0        7     0.002500000     0  C   R 16 + 16 (  318386) [0]",
        "  8,0    0        8     0.003000000     0  C  FN [0]",
        "  8,0    0        9     0.004000000     0  C  DS 4096 + 64 [0]",
        "  8,0    1        0     0.000024346     0  m   N cfq4162 alloced",
        "  8,16   0        1     0.005000000     0  C   R 0 + 8 [0]",
        "  8,0    0       10     0.006000000     0  C   W 99999999999 + 8 [0]",
        "  8,0    0       11     bogus",
        "  8,0    0       12     0.007000000     0  C   W 8",
        "CPU0 (8,0):",
        " Reads Queued:           1,        8KiB\t Writes Queued:           1,        4KiB",
        " Read Dispatches:        1,        8KiB\t Write Dispatches:        1,        4KiB",
        "Total (8,0):",
        " Reads Completed:        1,        8KiB\t Writes Completed:       2,        4KiB",
        "Throughput (R/W): 5KiB/s / 2KiB/s",
        "Events (8,0): 10 entries",
        "Skips: 0 forward (0 -   0.0%)");

    [Fact]
    public void Blkparse_counts_read_and_write_completions_only()
    {
        var map = NewMap();
        var r = Import(Blkparse, HeatTraceFormat.Blkparse, map);

        r.ImportedBackend.Should().Be("8,0");
        r.Backends.Should().Equal(new HeatTraceBackend("8,0", 1, 2, true), new HeatTraceBackend("8,16", 1, 0, false));
        r.IosImported.Should().Be(2);
        r.IosOutsideDisk.Should().Be(1);
        r.MalformedSamples.Select(s => s.Line).Should().Equal(13, 14);
        r.LinesIgnored.Should().Be(22 - 2 - 4, "every line but the malformed ones and the four completions");

        map.GetUnit(256).Should().Be(new HeatUnit(1 << 20, 4096, 0, 1, 1), "sector 2048 of 512 bytes is 1 MiB");
        map.GetUnit(2).Reads.Should().Be(1, "sectors 16 to 31 are bytes 8192 to 16383");
        map.GetUnit(3).Reads.Should().Be(1);
        map.GetUnit(4).Reads.Should().Be(0);
        map.GetUnit(0).Reads.Should().Be(0, "the read of 8,16 belongs to another device");
        r.FirstIo.Should().Be(T0.AddTicks(1882), "blkparse times are seconds from the start of the trace");
        r.LastIo.Should().Be(T0.AddTicks(25_000));
    }

    [Fact]
    public void Blkparse_device_filter_selects_a_device()
    {
        var map = NewMap();
        var r = Import(Blkparse, HeatTraceFormat.Blkparse, map, new HeatImportOptions { Device = "8,16", TraceStart = T0 });
        r.ImportedBackend.Should().Be("8,16");
        map.GetUnit(0).Reads.Should().Be(1);
        map.TotalWrites.Should().Be(0);
    }

    private static readonly string Msr = Lines(
        "Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime",
        "116444736000000000,hm,0,Read,4096,4096,100",
        "116444736010000000,hm,0,Write,8192,16384,200",
        "116444736020000000,hm,1,Read,0,4096,100",
        "116444736030000000,src1,0,Read,0,4096,100",
        "116444736040000000,hm,0,Erase,0,4096,100",
        "116444736050000000,hm,0,Read,4096",
        "116444736060000000,hm,0,Read,-4096,4096,100");

    [Fact]
    public void Msr_cambridge_converts_filetime_and_filters_host_and_disk()
    {
        var map = NewMap();
        var r = Import(Msr, HeatTraceFormat.MsrCambridge, map, new HeatImportOptions { Host = "hm", Device = "0", TraceStart = T0 });

        r.ImportedBackend.Should().Be("hm,0");
        r.IosImported.Should().Be(2);
        r.IosOfOtherDevices.Should().Be(2);
        r.FirstIo.Should().Be(DateTimeOffset.UnixEpoch, "FILETIME 116444736000000000 is 1970-01-01");
        r.LastIo.Should().Be(DateTimeOffset.UnixEpoch.AddSeconds(1));
        r.MalformedSamples.Select(s => s.Line).Should().Equal(6, 7, 8);
        r.MalformedSamples[0].Reason.Should().Contain("Erase");
        r.LinesIgnored.Should().Be(1, "the header");
        map.GetUnit(1).Reads.Should().Be(1);
        Enumerable.Range(2, 4).Select(u => map.GetUnit(u).Writes).Should().Equal(1, 1, 1, 1);

        var hm1 = NewMap();
        Import(Msr, HeatTraceFormat.MsrCambridge, hm1, new HeatImportOptions { Host = "hm", Device = "1" }).ImportedBackend.Should().Be("hm,1");
        hm1.GetUnit(0).Reads.Should().Be(1);

        var anyHost = NewMap();
        Import(Msr, HeatTraceFormat.MsrCambridge, anyHost, new HeatImportOptions { Host = "src1" }).ImportedBackend.Should().Be("src1,0");
    }

    private static readonly string Alibaba = Lines(
        "device_id,opcode,offset,length,timestamp",
        "3,R,4096,4096,1577808000000000",
        "3,W,0,8192,1577808000500000",
        "7,R,0,4096,1577808001000000",
        "3,X,0,4096,1577808002000000",
        "3,R,0,4096,99999999999999999999");

    [Fact]
    public void Alibaba_reads_microsecond_timestamps_and_filters_devices()
    {
        var map = NewMap();
        var r = Import(Alibaba, HeatTraceFormat.AlibabaBlock, map);
        r.ImportedBackend.Should().Be("3");
        r.IosImported.Should().Be(2);
        r.FirstIo.Should().Be(new DateTimeOffset(2019, 12, 31, 16, 0, 0, TimeSpan.Zero));
        r.LastIo.Should().Be(new DateTimeOffset(2019, 12, 31, 16, 0, 0, 500, TimeSpan.Zero));
        r.MalformedSamples.Select(s => s.Line).Should().Equal(5, 6);
        map.GetUnit(0).Should().Be(new HeatUnit(0, 4096, 0, 1, 1));
        map.GetUnit(1).Should().Be(new HeatUnit(4096, 4096, 1, 1, 2));

        var seven = NewMap();
        Import(Alibaba, HeatTraceFormat.AlibabaBlock, seven, new HeatImportOptions { Device = "7" }).IosImported.Should().Be(1);
        seven.GetUnit(0).Reads.Should().Be(1);
    }

    [Fact]
    public void Fio_version_2_ignores_file_actions_syncs_and_waits()
    {
        var map = NewMap();
        var r = Import(Lines(
            "fio version 2 iolog",
            "/dev/vdb add",
            "/dev/vdb open",
            "/dev/vdb write 0 4096",
            "/dev/vdb read 4096 8192",
            "/dev/vdb sync 0 0",
            "/dev/vdb wait 0 1000",
            "/dev/vdb trim 0 4096",
            "/dev/vdb frobnicate 0 4096",
            "/dev/vdb read 4096",
            "/dev/vdb close"), HeatTraceFormat.FioIolog, map);
        r.ImportedBackend.Should().Be("/dev/vdb");
        r.IosImported.Should().Be(2);
        r.LinesIgnored.Should().Be(7);
        r.MalformedSamples.Select(s => s.Line).Should().Equal(9, 10);
        r.Warnings.Should().BeEmpty();
        map.GetUnit(0).Writes.Should().Be(1);
        map.GetUnit(1).Reads.Should().Be(1);
        map.GetUnit(2).Reads.Should().Be(1);
        r.FirstIo.Should().Be(T0);
    }

    /// <summary>What fio 3.33 wrote for a small randrw job (write_iolog), cut to a few lines.</summary>
    internal static readonly string FioV3 = Lines(
        "fio version 3 iolog",
        "17 /tmp/heatx/f.dat add",
        "116 /tmp/heatx/f.dat open",
        "121 /tmp/heatx/f.dat read 12288 4096",
        "404 /tmp/heatx/f.dat read 192512 4096",
        "619 /tmp/heatx/f.dat write 122880 4096",
        "2292 /tmp/heatx/f.dat write 163840 4096",
        "2311 /tmp/heatx/f.dat close");

    [Fact]
    public void Fio_version_3_timestamps_are_microseconds_from_the_start()
    {
        var map = NewMap();
        var r = Import(FioV3, HeatTraceFormat.FioIolog, map);
        r.IosImported.Should().Be(4);
        r.FirstIo.Should().Be(T0.AddTicks(1210));
        r.LastIo.Should().Be(T0.AddTicks(22920));
        map.GetUnit(3).Reads.Should().Be(1);
        map.GetUnit(47).Reads.Should().Be(1);
        map.GetUnit(30).Writes.Should().Be(1);
        map.GetUnit(40).Writes.Should().Be(1);

        var ms = NewMap();
        var rms = Import(FioV3, HeatTraceFormat.FioIolog, ms, new HeatImportOptions { TraceStart = T0, FioTimestampUnit = TimeSpan.FromMilliseconds(1) });
        rms.LastIo.Should().Be(T0.AddMilliseconds(2292));
    }

    [Fact]
    public void Fio_without_header_guesses_each_line_and_warns()
    {
        var map = NewMap();
        var r = Import(Lines("5 /f read 0 4096", "/f write 4096 4096"), HeatTraceFormat.FioIolog, map);
        r.Warnings.Should().ContainSingle().Which.Should().Contain("header");
        r.IosImported.Should().Be(2);
        r.FirstIo.Should().Be(T0);
        r.LastIo.Should().Be(T0.AddTicks(50));
    }

    [Fact]
    public void An_endless_line_is_one_malformed_line_and_the_rest_still_imports()
    {
        var map = NewMap();
        var text = new string('x', 3 << 20) + "\n" + $"blk_co_preadv blk {BlkA} bs 0x1 offset 0 bytes 4096 flags 0x0\n" + new string('y', 100_000);
        var r = Import(text, HeatTraceFormat.QemuTrace, map);
        r.LinesRead.Should().Be(3);
        r.MalformedLines.Should().Be(2);
        r.MalformedSamples[0].Text.Should().HaveLength(200).And.MatchRegex("^x+$");
        r.MalformedSamples[0].Reason.Should().Contain("4096 characters");
        r.IosImported.Should().Be(1);
    }

    [Fact]
    public void Quotes_are_limited_but_every_malformed_line_is_counted()
    {
        var map = NewMap();
        var text = string.Concat(Enumerable.Range(0, 50).Select(i => $"garbage line {i}\n"));
        var r = Import(text, HeatTraceFormat.AlibabaBlock, map, new HeatImportOptions { MaxQuotedLines = 3 });
        r.MalformedLines.Should().Be(50);
        r.MalformedSamples.Select(s => s.Line).Should().Equal(1, 2, 3);
    }

    [Fact]
    public void Crlf_line_ends_and_a_byte_order_mark_are_accepted()
    {
        var map = NewMap();
        var bytes = System.Text.Encoding.UTF8.GetPreamble().Concat(System.Text.Encoding.UTF8.GetBytes("3,R,0,4096,1577808000000000\r\n3,W,4096,4096,1577808000000001\r\n")).ToArray();
        var r = HeatImport.Import(new MemoryStream(bytes), HeatTraceFormat.AlibabaBlock, map);
        r.MalformedLines.Should().Be(0);
        r.IosImported.Should().Be(2);
    }

    [Fact]
    public void A_cancelled_import_leaves_the_map_untouched()
    {
        var map = NewMap();
        var text = string.Concat(Enumerable.Range(0, 20_000).Select(i => $"1,W,{i % 1000 * 4096},4096,1577808000000000\n"));
        using var cts = new CancellationTokenSource();
        var reader = new CancellingReader(text, cts, afterReads: 3);
        var act = () => HeatImport.Import(reader, HeatTraceFormat.AlibabaBlock, map, null, null, cts.Token);
        act.Should().Throw<OperationCanceledException>();
        reader.Reads.Should().BeGreaterThanOrEqualTo(3, "the import was under way when cancelled");
        map.TotalWrites.Should().Be(0);
        map.TouchedUnits().Should().BeEmpty();
    }

    [Fact]
    public void Progress_reports_lines_ios_and_bytes()
    {
        var map = NewMap();
        var text = string.Concat(Enumerable.Range(0, 70_000).Select(i => $"1,R,{i % 1000 * 4096},4096,1577808000000000\n"));
        var reports = new List<HeatImportProgress>();
        var bytes = System.Text.Encoding.UTF8.GetBytes(text);
        HeatImport.Import(new MemoryStream(bytes), HeatTraceFormat.AlibabaBlock, map, null, new SyncProgress(reports.Add));
        reports.Should().HaveCount(2, "one after 65536 lines, one at the end");
        reports[0].LinesRead.Should().Be(65536);
        reports[0].IosSeen.Should().Be(65536);
        reports[^1].Should().Be(new HeatImportProgress(70_000, 70_000, bytes.Length));
        map.TotalReads.Should().Be(70_000);
    }

    [Fact]
    public void Decay_along_the_trace_weighs_old_io_less()
    {
        var start = new DateTimeOffset(2020, 1, 1, 0, 0, 0, TimeSpan.Zero);
        var map = new HeatMap(4 << 20, 4096, halfLife: TimeSpan.FromHours(1)) { DecayedAt = start };
        var text = DecayTrace(start);
        var r = HeatImport.Import(new StringReader(text), HeatTraceFormat.AlibabaBlock, map, new HeatImportOptions { DecayAlongTrace = true });
        r.IosImported.Should().Be(80);
        map.GetUnit(0).Writes.Should().Be(20, "40 writes one half-life before the end weigh half (an exact factor needs no rounding)");
        map.GetUnit(1).Writes.Should().Be(40);
        map.DecayedAt.Should().Be(start.AddHours(1), "the counts are decayed to the trace's end");
        map.TotalWrites.Should().Be(80, "the totals count operations, undecayed");

        // A map whose moment is years after the trace decays the trace away on merging.
        var now = new HeatMap(4 << 20, 4096, halfLife: TimeSpan.FromHours(1));
        HeatImport.Import(new StringReader(text), HeatTraceFormat.AlibabaBlock, now, new HeatImportOptions { DecayAlongTrace = true });
        now.TouchedUnits().Should().BeEmpty();
    }

    private static string DecayTrace(DateTimeOffset start)
    {
        var us = (start - DateTimeOffset.UnixEpoch).Ticks / 10;
        var hour = 3_600_000_000L;
        return string.Join('\n', Enumerable.Range(0, 40).Select(_ => $"1,W,0,4096,{us}")
            .Concat(Enumerable.Range(0, 40).Select(_ => $"1,W,4096,4096,{us + hour}")));
    }

    [Fact]
    public void Without_decay_along_the_trace_every_io_counts_fully()
    {
        var map = new HeatMap(4 << 20, 4096, halfLife: TimeSpan.FromHours(1));
        var before = map.DecayedAt;
        var r = Import(Lines("1,W,0,4096,1577808000000000", "1,W,0,4096,1577818000000000"), HeatTraceFormat.AlibabaBlock, map);
        r.IosImported.Should().Be(2);
        map.GetUnit(0).Writes.Should().Be(2);
        map.DecayedAt.Should().Be(before);
    }

    [Fact]
    public void Importing_into_a_map_with_heat_adds_to_it()
    {
        var map = NewMap();
        map.RecordRead(0, 4096);
        Import(Lines("1,R,0,4096,1577808000000000"), HeatTraceFormat.AlibabaBlock, map);
        map.GetUnit(0).Reads.Should().Be(2);
        map.TotalReads.Should().Be(2);
    }

    [Fact]
    public void More_devices_than_can_be_recorded_are_counted_and_named()
    {
        var map = NewMap();
        // Nine devices, the ninth the busiest: only eight get a private map.
        var lines = Enumerable.Range(0, 8).Select(d => $"{d},R,0,4096,1577808000000000")
            .Concat(Enumerable.Range(0, 5).Select(_ => "8,R,4096,4096,1577808000000000"));
        var r = Import(string.Join('\n', lines), HeatTraceFormat.AlibabaBlock, map);
        r.Backends.Should().HaveCount(9);
        r.Backends[0].Should().Be(new HeatTraceBackend("8", 5, 0, false));
        r.Warnings.Should().Contain(w => w.Contains("\"8\""));

        var named = NewMap();
        var rn = Import(string.Join('\n', lines), HeatTraceFormat.AlibabaBlock, named, new HeatImportOptions { Device = "8" });
        rn.IosImported.Should().Be(5);
        named.GetUnit(1).Reads.Should().Be(5);
    }

    [Fact]
    public void A_filter_matching_nothing_imports_nothing_and_says_so()
    {
        var map = NewMap();
        var r = Import(Alibaba, HeatTraceFormat.AlibabaBlock, map, new HeatImportOptions { Device = "99" });
        r.ImportedBackend.Should().BeNull();
        r.IosImported.Should().Be(0);
        r.Warnings.Should().Contain(w => w.Contains("matched"));
        map.TotalReads.Should().Be(0);
    }

    [Fact]
    public void Arguments_that_cannot_work_are_refused_before_reading()
    {
        var map = NewMap();
        var bitmapFromText = () => HeatImport.Import(new StringReader(""), HeatTraceFormat.QemuDirtyBitmap, map);
        bitmapFromText.Should().Throw<ArgumentException>().WithMessage("*seekable stream*");
        var bitmapFromPipe = () => HeatImport.Import(new NonSeekable(), HeatTraceFormat.QemuDirtyBitmap, map);
        bitmapFromPipe.Should().Throw<ArgumentException>().WithMessage("*seekable*");
        var zeroUnit = () => Import(FioV3, HeatTraceFormat.FioIolog, map, new HeatImportOptions { FioTimestampUnit = TimeSpan.Zero });
        zeroUnit.Should().Throw<ArgumentOutOfRangeException>();
        var tinyLines = () => Import("", HeatTraceFormat.QemuTrace, map, new HeatImportOptions { MaxLineLength = 4 });
        tinyLines.Should().Throw<ArgumentOutOfRangeException>();
    }

    private sealed class NonSeekable : MemoryStream
    {
        public override bool CanSeek => false;
    }

    [Fact]
    public void Damaged_traces_never_throw_and_every_line_is_accounted_for()
    {
        string[] pieces =
        [
            $"blk_co_preadv blk {BlkA} bs 0x1 offset 4096 bytes 4096 flags 0x0",
            "  8,0    0        7     0.002500000     0  C   R 16 + 16 [0]",
            "116444736000000000,hm,0,Write,4096,4096,100",
            "3,R,4096,4096,1577808000000000",
            "fio version 3 iolog",
            "12 /f write 0 4096",
            "/f read 0 4096",
        ];
        var formats = Enum.GetValues<HeatTraceFormat>().Where(f => f != HeatTraceFormat.QemuDirtyBitmap).ToArray();
        var line = Gen.OneOf<string>(
            Gen.OneOf(pieces),
            Gen.Select(Gen.OneOf(pieces), Gen.Int[0, 80], Gen.Char, (p, cut, c) => p[..Math.Min(cut, p.Length)] + c),
            Gen.String);
        Gen.Select(Gen.OneOf(formats), line.Array[0, 40]).Sample((format, lines) =>
        {
            var map = NewMap();
            var text = string.Join('\n', lines.Select(l => l.Replace("\n", "", StringComparison.Ordinal).Replace("\r", "", StringComparison.Ordinal)));
            var r = Import(text, format, map);
            var clean = lines.Select(l => l.Replace("\n", "", StringComparison.Ordinal).Replace("\r", "", StringComparison.Ordinal)).ToArray();
            r.LinesRead.Should().Be(clean.Length - (clean.Length > 0 && clean[^1].Length == 0 ? 1 : 0), "a final empty line is no line");
            (r.LinesIgnored + r.MalformedLines + r.IosImported + r.IosOutsideDisk + r.IosOfOtherDevices).Should().Be(r.LinesRead);
            r.MalformedSamples.Count.Should().Be((int)Math.Min(r.MalformedLines, 5));
            map.TotalReads.Should().Be(r.ReadsImported);
            map.TotalWrites.Should().Be(r.WritesImported);
        }, iter: 300, threads: 1);
    }

    /// <summary>Cancels a token once the importer has asked for text a given number of times.</summary>
    private sealed class CancellingReader(string text, CancellationTokenSource cts, int afterReads) : TextReader
    {
        private readonly StringReader _inner = new(text);

        public int Reads { get; private set; }

        public override int Read(char[] buffer, int index, int count)
        {
            if (++Reads == afterReads)
            {
                cts.Cancel();
            }
            return _inner.Read(buffer, index, count);
        }
    }

    /// <summary>Progress&lt;T&gt; posts to the thread pool; the tests need the callback inline.</summary>
    private sealed class SyncProgress(Action<HeatImportProgress> onReport) : IProgress<HeatImportProgress>
    {
        public void Report(HeatImportProgress value) => onReport(value);
    }
}
