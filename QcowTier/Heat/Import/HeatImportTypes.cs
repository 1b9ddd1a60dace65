namespace QcowTier;

/// <summary>The I/O trace formats <see cref="HeatImport"/> reads.</summary>
public enum HeatTraceFormat
{
    /// <summary>
    /// QEMU's <c>log</c> trace backend with <c>blk_co_preadv</c>/<c>blk_co_pwritev</c> enabled
    /// (<c>-trace enable=blk_co_p*</c>), plain or with the <c>pid@sec.usec:</c> prefix of <c>-msg timestamp=on</c>.
    /// A device is a BlockBackend (<c>blk 0x…</c>).
    /// </summary>
    QemuTrace = 0,

    /// <summary>blkparse's default text output; only completions (<c>C</c>) count. A device is <c>major,minor</c>.</summary>
    Blkparse = 1,

    /// <summary>MSR Cambridge CSV: <c>Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime</c>, Windows FILETIME timestamps.</summary>
    MsrCambridge = 2,

    /// <summary>fio <c>write_iolog</c> output, version 2 or 3 (from the header line). A device is a file name.</summary>
    FioIolog = 3,

    /// <summary>Alibaba block traces: <c>device_id,opcode,offset,length,timestamp</c> (µs since the Unix epoch).</summary>
    AlibabaBlock = 4,

    /// <summary>
    /// The persistent dirty bitmaps of a qcow2 image (write heat only): each dirty granule counts as one
    /// write on the units it covers. The input is the image itself, a seekable stream.
    /// </summary>
    QemuDirtyBitmap = 5,
}

/// <summary>What <see cref="HeatImport"/> imports and how.</summary>
public sealed class HeatImportOptions
{
    /// <summary>
    /// The device to import; null for the busiest one (the one with the most I/Os). Its meaning depends on
    /// the format: the BlockBackend pointer of a QEMU trace (<c>0x55d1…</c>), <c>major,minor</c> for blkparse,
    /// the disk number for MSR Cambridge, the file name for fio, the device id for Alibaba.
    /// </summary>
    public string? Device { get; init; }

    /// <summary>MSR Cambridge only: the host name to import; null for any.</summary>
    public string? Host { get; init; }

    /// <summary>Dirty bitmaps only: the bitmap to import; null for the one with the most dirty granules.</summary>
    public string? BitmapName { get; init; }

    /// <summary>
    /// Time zero of traces with relative timestamps (blkparse, fio version 3) and the time of every I/O of
    /// traces without timestamps (plain QEMU logs, fio version 2, dirty bitmaps). Null for the moment the import starts.
    /// </summary>
    public DateTimeOffset? TraceStart { get; init; }

    /// <summary>
    /// The unit of fio version 3 timestamps. Default one microsecond, which is what fio 3.31 and later write
    /// (<c>utime_since_now</c>); set it to one millisecond for logs from tools that write milliseconds.
    /// </summary>
    public TimeSpan FioTimestampUnit { get; init; } = TimeSpan.FromTicks(10);

    /// <summary>
    /// Decay counts along the trace's own clock, as if the map had been recording live: an I/O one half-life
    /// older than the trace's last one weighs half as much. The imported counts are then decayed to the later
    /// of the trace's end and the map's <see cref="HeatMap.DecayedAt"/>. Default false: every I/O counts fully.
    /// </summary>
    public bool DecayAlongTrace { get; init; }

    /// <summary>How many malformed lines to quote in <see cref="HeatImportResult.MalformedSamples"/>. Default 5.</summary>
    public int MaxQuotedLines { get; init; } = 5;

    /// <summary>Lines longer than this many characters are counted as malformed and skipped. Default 4096.</summary>
    public int MaxLineLength { get; init; } = 4096;
}

/// <summary>How far an import has got.</summary>
/// <param name="LinesRead">Lines read so far (dirty bitmaps: bitmap clusters read).</param>
/// <param name="IosSeen">I/Os parsed so far, of every device.</param>
/// <param name="BytesRead">Bytes taken from the input stream so far; 0 when reading from a <see cref="TextReader"/>.</param>
public readonly record struct HeatImportProgress(long LinesRead, long IosSeen, long BytesRead);

/// <summary>A malformed line of a trace, quoted.</summary>
/// <param name="Line">1-based line number.</param>
/// <param name="Text">The line, cut to 200 characters.</param>
/// <param name="Reason">What is wrong with it.</param>
public readonly record struct HeatImportIssue(long Line, string Text, string Reason);

/// <summary>A device (QEMU BlockBackend, disk, file or bitmap) seen in a trace.</summary>
/// <param name="Name">Its name in the trace.</param>
/// <param name="Reads">Read I/Os seen.</param>
/// <param name="Writes">Write I/Os seen (dirty bitmaps: dirty granules).</param>
/// <param name="Imported">Whether its I/Os went into the heat map.</param>
public readonly record struct HeatTraceBackend(string Name, long Reads, long Writes, bool Imported);

/// <summary>What an import did.</summary>
public sealed class HeatImportResult
{
    internal HeatImportResult() { }

    /// <summary>The format read.</summary>
    public HeatTraceFormat Format { get; internal init; }

    /// <summary>Lines read (dirty bitmaps: 0).</summary>
    public long LinesRead { get; internal init; }

    /// <summary>I/Os recorded into the heat map (those clipped at the end of the disk included).</summary>
    public long IosImported { get; internal init; }

    /// <summary>Read I/Os recorded.</summary>
    public long ReadsImported { get; internal init; }

    /// <summary>Write I/Os recorded.</summary>
    public long WritesImported { get; internal init; }

    /// <summary>Lines that are valid but carry no read or write: headers, other trace events, queue/issue actions, syncs, discards.</summary>
    public long LinesIgnored { get; internal init; }

    /// <summary>Lines that could not be parsed; they are skipped.</summary>
    public long MalformedLines { get; internal init; }

    /// <summary>The first malformed lines, quoted with their line numbers.</summary>
    public IReadOnlyList<HeatImportIssue> MalformedSamples { get; internal init; } = [];

    /// <summary>I/Os of the imported device that start at or beyond the end of the disk; not recorded.</summary>
    public long IosOutsideDisk { get; internal init; }

    /// <summary>I/Os of the imported device that cross the end of the disk; recorded up to the end.</summary>
    public long IosClipped { get; internal init; }

    /// <summary>I/Os of devices (or hosts) not imported: other than the one asked for, or than the busiest.</summary>
    public long IosOfOtherDevices { get; internal init; }

    /// <summary>Every device seen (at most 1024; the rest are summed under the name "(others)"), busiest first.</summary>
    public IReadOnlyList<HeatTraceBackend> Backends { get; internal init; } = [];

    /// <summary>The device whose I/Os were imported, or null when none was.</summary>
    public string? ImportedBackend { get; internal init; }

    /// <summary>Time of the first imported I/O, or null when nothing was imported.</summary>
    public DateTimeOffset? FirstIo { get; internal init; }

    /// <summary>Time of the last imported I/O, or null.</summary>
    public DateTimeOffset? LastIo { get; internal init; }

    /// <summary>Things the caller should know: a missing header, a skipped bitmap, a device that could not be tracked.</summary>
    public IReadOnlyList<string> Warnings { get; internal init; } = [];
}
