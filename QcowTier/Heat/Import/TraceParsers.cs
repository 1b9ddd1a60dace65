using System.Globalization;

namespace QcowTier.Heat.Import;

internal enum ParseOutcome
{
    Io,
    Ignored,
    Malformed,
}

internal enum TraceTime
{
    None,
    /// <summary>UTC ticks.</summary>
    Absolute,
    /// <summary>Ticks since the start of the trace.</summary>
    Relative,
}

/// <summary>One parsed I/O; <see cref="Device"/> points into the line being parsed.</summary>
internal ref struct TraceIo
{
    public bool Write;
    public long Offset;
    public long Length;
    public TraceTime TimeKind;
    public long Ticks;
    public ReadOnlySpan<char> Device;
    public string? Reason;
}

/// <summary>Parses the lines of one text trace format. Instances keep per-file state (headers, summaries).</summary>
internal abstract class TraceParser(HeatImportOptions options)
{
    /// <summary>Ticks of the largest relative time we accept (about 300 years): beyond it the arithmetic could overflow.</summary>
    protected const long MaxRelativeTicks = 100_000L * TimeSpan.TicksPerDay;

    protected HeatImportOptions Options { get; } = options;

    /// <summary>Warnings about the file as a whole (say, a missing header).</summary>
    public List<string> Warnings { get; } = [];

    public abstract ParseOutcome Parse(ReadOnlySpan<char> line, ref TraceIo io);

    /// <summary>Whether a device's I/Os may be imported under the options' filters.</summary>
    public virtual bool Accepts(ReadOnlySpan<char> device) => Options.Device is null || device.SequenceEqual(Options.Device);

    public static TraceParser Create(HeatTraceFormat format, HeatImportOptions options) => format switch
    {
        HeatTraceFormat.QemuTrace => new QemuTraceParser(options),
        HeatTraceFormat.Blkparse => new BlkparseParser(options),
        HeatTraceFormat.MsrCambridge => new MsrCambridgeParser(options),
        HeatTraceFormat.FioIolog => new FioIologParser(options),
        HeatTraceFormat.AlibabaBlock => new AlibabaParser(options),
        _ => throw new ArgumentOutOfRangeException(nameof(format), format, "not a text trace format"),
    };

    protected static ParseOutcome Malformed(ref TraceIo io, string reason)
    {
        io.Reason = reason;
        return ParseOutcome.Malformed;
    }

    protected static bool TryNonNegative(ReadOnlySpan<char> s, out long value) =>
        long.TryParse(s, NumberStyles.None, CultureInfo.InvariantCulture, out value);

    /// <summary>Splits on runs of spaces and tabs into at most <paramref name="ranges"/>.Length tokens.</summary>
    /// <returns>The token count, or ranges.Length + 1 when there are more tokens than room.</returns>
    protected static int SplitWhitespace(ReadOnlySpan<char> line, Span<Range> ranges)
    {
        var n = 0;
        var i = 0;
        while (true)
        {
            while (i < line.Length && (line[i] == ' ' || line[i] == '\t'))
            {
                i++;
            }
            if (i >= line.Length)
            {
                return n;
            }
            var start = i;
            while (i < line.Length && line[i] != ' ' && line[i] != '\t')
            {
                i++;
            }
            if (n == ranges.Length)
            {
                return n + 1;
            }
            ranges[n++] = start..i;
        }
    }

    /// <summary>Parses "seconds.fraction" (up to 9 fraction digits) into ticks.</summary>
    protected static bool TrySecondsFraction(ReadOnlySpan<char> s, long maxSeconds, out long ticks)
    {
        ticks = 0;
        var dot = s.IndexOf('.');
        var whole = dot < 0 ? s : s[..dot];
        var frac = dot < 0 ? [] : s[(dot + 1)..];
        if (whole.Length == 0 || frac.Length > 9 || (dot >= 0 && frac.Length == 0)
            || !TryNonNegative(whole, out var sec) || sec > maxSeconds)
        {
            return false;
        }
        long fracTicks = 0;
        if (frac.Length > 0)
        {
            if (!TryNonNegative(frac, out var f))
            {
                return false;
            }
            // Scale to 9 digits (ns), then to 100 ns ticks.
            for (var k = frac.Length; k < 9; k++)
            {
                f *= 10;
            }
            fracTicks = f / 100;
        }
        ticks = sec * TimeSpan.TicksPerSecond + fracTicks;
        return true;
    }

    protected static bool TryUnixTicks(long unitsSinceEpoch, long ticksPerUnit, out long utcTicks)
    {
        var maxUnits = (DateTime.MaxValue.Ticks - DateTime.UnixEpoch.Ticks) / ticksPerUnit;
        if (unitsSinceEpoch > maxUnits)
        {
            utcTicks = 0;
            return false;
        }
        utcTicks = DateTime.UnixEpoch.Ticks + unitsSinceEpoch * ticksPerUnit;
        return true;
    }

    protected static bool IsWord(ReadOnlySpan<char> s)
    {
        if (s.IsEmpty)
        {
            return false;
        }
        foreach (var c in s)
        {
            if (!char.IsAsciiLetterOrDigit(c) && c != '_')
            {
                return false;
            }
        }
        return true;
    }
}

/// <summary>
/// QEMU's log trace backend: <c>[pid@sec.usec:]blk_co_preadv blk 0x… bs 0x… offset N bytes N flags 0x…</c>.
/// Other events in the log are ignored, so a log traced with more events still imports.
/// </summary>
internal sealed class QemuTraceParser(HeatImportOptions options) : TraceParser(options)
{
    public override ParseOutcome Parse(ReadOnlySpan<char> line, ref TraceIo io)
    {
        var s = line.TrimStart();
        if (s.IsEmpty)
        {
            return ParseOutcome.Ignored;
        }
        io.TimeKind = TraceTime.None;
        if (char.IsAsciiDigit(s[0]))
        {
            // "pid@sec.usec:" from -msg timestamp=on (qemu_log with message_with_timestamp).
            var at = s.IndexOf('@');
            var colon = s.IndexOf(':');
            if (at <= 0 || colon <= at || !TryNonNegative(s[..at], out _))
            {
                return Malformed(ref io, "a timestamp prefix must read pid@seconds.microseconds:");
            }
            if (!TrySecondsFraction(s[(at + 1)..colon], 100_000_000_000, out var since) || !TryUnixTicks(since, 1, out io.Ticks))
            {
                return Malformed(ref io, "the timestamp of the prefix is not seconds.microseconds since the epoch");
            }
            io.TimeKind = TraceTime.Absolute;
            s = s[(colon + 1)..].TrimStart();
        }
        var sp = s.IndexOfAny(' ', '\t');
        var evt = sp < 0 ? s : s[..sp];
        bool write;
        if (evt.SequenceEqual("blk_co_preadv"))
        {
            write = false;
        }
        else if (evt.SequenceEqual("blk_co_pwritev"))
        {
            write = true;
        }
        else
        {
            return IsWord(evt) ? ParseOutcome.Ignored : Malformed(ref io, "not a trace event");
        }

        Span<Range> t = stackalloc Range[16];
        var args = s[evt.Length..];
        var n = SplitWhitespace(args, t);
        if (n > t.Length || n % 2 != 0)
        {
            return Malformed(ref io, $"{evt}: arguments are not name/value pairs");
        }
        var haveOffset = false;
        var haveBytes = false;
        io.Device = default;
        for (var i = 0; i < n; i += 2)
        {
            var name = args[t[i]];
            var value = args[t[i + 1]];
            if (name.SequenceEqual("blk"))
            {
                io.Device = value;
            }
            else if (name.SequenceEqual("offset"))
            {
                haveOffset = TryNonNegative(value, out io.Offset);
                if (!haveOffset)
                {
                    return Malformed(ref io, $"{evt}: offset '{value}' is not a non-negative integer");
                }
            }
            else if (name.SequenceEqual("bytes"))
            {
                haveBytes = TryNonNegative(value, out io.Length);
                if (!haveBytes)
                {
                    return Malformed(ref io, $"{evt}: bytes '{value}' is not a non-negative integer");
                }
            }
        }
        if (io.Device.IsEmpty || !haveOffset || !haveBytes)
        {
            return Malformed(ref io, $"{evt}: blk, offset or bytes missing");
        }
        io.Write = write;
        return ParseOutcome.Io;
    }
}

/// <summary>
/// blkparse's default output: <c>maj,min cpu seq sec.nsec pid action rwbs sector + count ...</c>.
/// Only completions count, so requests that were queued but never finished, and the Q/G/I/D events of
/// the same request, are not counted twice.
/// </summary>
internal sealed class BlkparseParser(HeatImportOptions options) : TraceParser(options)
{
    private bool _inSummary;

    public override ParseOutcome Parse(ReadOnlySpan<char> line, ref TraceIo io)
    {
        Span<Range> t = stackalloc Range[12];
        var n = SplitWhitespace(line, t);
        if (n == 0)
        {
            return ParseOutcome.Ignored;
        }
        var dev = line[t[0]];
        var comma = dev.IndexOf(',');
        var isEvent = comma > 0 && TryNonNegative(dev[..comma], out _) && TryNonNegative(dev[(comma + 1)..], out _);
        if (!isEvent)
        {
            // The per-CPU and per-device summary blkparse prints at the end ("CPU0 (8,0):", "Total (8,0):",
            // " Reads Queued: ...", "Throughput (R/W): ...", "Events (8,0): ..."): everything after its first line.
            if (dev.StartsWith("CPU") || dev.SequenceEqual("Total") || dev.SequenceEqual("Throughput") || dev.SequenceEqual("Events"))
            {
                _inSummary = true;
            }
            return _inSummary ? ParseOutcome.Ignored : Malformed(ref io, "does not start with major,minor");
        }
        _inSummary = false;
        if (n < 7)
        {
            return Malformed(ref io, "fewer fields than device, cpu, sequence, time, pid, action and RWBS");
        }
        var action = line[t[5]];
        if (!action.SequenceEqual("C"))
        {
            return ParseOutcome.Ignored;
        }
        var rwbs = line[t[6]];
        var read = rwbs.Contains('R');
        var write = rwbs.Contains('W');
        if (read == write)
        {
            return ParseOutcome.Ignored; // flushes, discards, passthrough commands: no data moved
        }
        if (n < 10 || !line[t[8]].SequenceEqual("+"))
        {
            return Malformed(ref io, "a read or write completion without 'sector + count'");
        }
        if (!TryNonNegative(line[t[7]], out var sector) || !TryNonNegative(line[t[9]], out var count)
            || sector > long.MaxValue / 512 || count > int.MaxValue)
        {
            return Malformed(ref io, "sector or sector count is not a non-negative integer");
        }
        if (!TrySecondsFraction(line[t[3]], MaxRelativeTicks / TimeSpan.TicksPerSecond, out io.Ticks))
        {
            return Malformed(ref io, $"time '{line[t[3]]}' is not seconds.nanoseconds");
        }
        io.TimeKind = TraceTime.Relative;
        io.Write = write;
        io.Offset = sector * 512;
        io.Length = count * 512;
        io.Device = dev;
        return ParseOutcome.Io;
    }
}

/// <summary>MSR Cambridge: <c>Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime</c>.</summary>
internal sealed class MsrCambridgeParser(HeatImportOptions options) : TraceParser(options)
{
    public override ParseOutcome Parse(ReadOnlySpan<char> line, ref TraceIo io)
    {
        if (line.IsWhiteSpace())
        {
            return ParseOutcome.Ignored;
        }
        Span<Range> f = stackalloc Range[8];
        var n = line.Split(f, ',');
        if (n != 7)
        {
            return Malformed(ref io, $"{n} fields, not 7 (Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime)");
        }
        if (line[f[0]].Trim().Equals("Timestamp", StringComparison.OrdinalIgnoreCase))
        {
            return ParseOutcome.Ignored;
        }
        if (!TryNonNegative(line[f[0]].Trim(), out var fileTime) || fileTime > DateTime.MaxValue.Ticks - DateTime.FromFileTimeUtc(0).Ticks)
        {
            return Malformed(ref io, "Timestamp is not a Windows FILETIME");
        }
        var type = line[f[3]].Trim();
        if (type.Equals("Read", StringComparison.OrdinalIgnoreCase))
        {
            io.Write = false;
        }
        else if (type.Equals("Write", StringComparison.OrdinalIgnoreCase))
        {
            io.Write = true;
        }
        else
        {
            return Malformed(ref io, $"Type '{type}' is neither Read nor Write");
        }
        if (!TryNonNegative(line[f[4]].Trim(), out io.Offset) || !TryNonNegative(line[f[5]].Trim(), out io.Length))
        {
            return Malformed(ref io, "Offset or Size is not a non-negative integer");
        }
        if (!TryNonNegative(line[f[2]].Trim(), out _) || line[f[1]].Trim().IsEmpty)
        {
            return Malformed(ref io, "Hostname is empty or DiskNumber is not a number");
        }
        io.TimeKind = TraceTime.Absolute;
        io.Ticks = DateTime.FromFileTimeUtc(0).Ticks + fileTime;
        io.Device = line[f[1].Start..f[2].End]; // "host,disk": both filters can see it without allocating
        return ParseOutcome.Io;
    }

    public override bool Accepts(ReadOnlySpan<char> device)
    {
        var comma = device.IndexOf(',');
        var host = device[..comma].Trim();
        var disk = device[(comma + 1)..].Trim();
        return (Options.Host is null || host.SequenceEqual(Options.Host))
            && (Options.Device is null || disk.SequenceEqual(Options.Device));
    }
}

/// <summary>Alibaba block traces: <c>device_id,opcode,offset,length,timestamp</c>.</summary>
internal sealed class AlibabaParser(HeatImportOptions options) : TraceParser(options)
{
    public override ParseOutcome Parse(ReadOnlySpan<char> line, ref TraceIo io)
    {
        if (line.IsWhiteSpace())
        {
            return ParseOutcome.Ignored;
        }
        Span<Range> f = stackalloc Range[6];
        var n = line.Split(f, ',');
        if (n != 5)
        {
            return Malformed(ref io, $"{n} fields, not 5 (device_id,opcode,offset,length,timestamp)");
        }
        if (line[f[0]].Trim().Equals("device_id", StringComparison.OrdinalIgnoreCase))
        {
            return ParseOutcome.Ignored;
        }
        var op = line[f[1]].Trim();
        if (op.Equals("R", StringComparison.OrdinalIgnoreCase))
        {
            io.Write = false;
        }
        else if (op.Equals("W", StringComparison.OrdinalIgnoreCase))
        {
            io.Write = true;
        }
        else
        {
            return Malformed(ref io, $"opcode '{op}' is neither R nor W");
        }
        if (!TryNonNegative(line[f[2]].Trim(), out io.Offset) || !TryNonNegative(line[f[3]].Trim(), out io.Length))
        {
            return Malformed(ref io, "offset or length is not a non-negative integer");
        }
        if (!TryNonNegative(line[f[4]].Trim(), out var us) || !TryUnixTicks(us, 10, out io.Ticks))
        {
            return Malformed(ref io, "timestamp is not microseconds since the Unix epoch");
        }
        var dev = line[f[0]].Trim();
        if (dev.IsEmpty)
        {
            return Malformed(ref io, "device_id is empty");
        }
        io.TimeKind = TraceTime.Absolute;
        io.Device = dev;
        return ParseOutcome.Io;
    }
}

/// <summary>
/// fio iologs: <c>fio version 2 iolog</c> (<c>file action [offset length]</c>) or <c>fio version 3 iolog</c>
/// (<c>time file action [offset length]</c>). File management lines (add, open, close) and syncs, trims and
/// waits carry no data and are ignored.
/// </summary>
internal sealed class FioIologParser(HeatImportOptions options) : TraceParser(options)
{
    private int _version; // 0 until the header (or the first line without one) is seen

    public override ParseOutcome Parse(ReadOnlySpan<char> line, ref TraceIo io)
    {
        var s = line.Trim();
        if (s.IsEmpty)
        {
            return ParseOutcome.Ignored;
        }
        if (s.StartsWith("fio version "))
        {
            if (s.SequenceEqual("fio version 2 iolog"))
            {
                _version = 2;
                return ParseOutcome.Ignored;
            }
            if (s.SequenceEqual("fio version 3 iolog"))
            {
                _version = 3;
                return ParseOutcome.Ignored;
            }
            return Malformed(ref io, "only fio iolog versions 2 and 3 are known");
        }
        Span<Range> t = stackalloc Range[6];
        var n = SplitWhitespace(s, t);
        if (_version == 0)
        {
            Warnings.Add("no 'fio version N iolog' header: the version is guessed from each line");
            _version = -1;
        }
        var v3 = _version == 3 || (_version == -1 && n is 3 or 5 && TryNonNegative(s[t[0]], out _));
        var first = v3 ? 1 : 0;
        if (v3)
        {
            if (n < 1 || !TryNonNegative(s[t[0]], out var ts))
            {
                return Malformed(ref io, "a version 3 line must start with a timestamp");
            }
            var unit = Options.FioTimestampUnit.Ticks;
            if (unit <= 0 || ts > MaxRelativeTicks / unit)
            {
                return Malformed(ref io, "timestamp out of range");
            }
            io.TimeKind = TraceTime.Relative;
            io.Ticks = ts * unit;
        }
        else
        {
            io.TimeKind = TraceTime.None;
        }
        var fields = n - first;
        if (fields == 2)
        {
            var act = s[t[first + 1]];
            return act.SequenceEqual("add") || act.SequenceEqual("open") || act.SequenceEqual("close")
                ? ParseOutcome.Ignored
                : Malformed(ref io, $"unknown file action '{act}'");
        }
        if (fields != 4)
        {
            return Malformed(ref io, v3 ? "not 'time file action [offset length]'" : "not 'file action [offset length]'");
        }
        var action = s[t[first + 1]];
        if (action.SequenceEqual("read"))
        {
            io.Write = false;
        }
        else if (action.SequenceEqual("write"))
        {
            io.Write = true;
        }
        else if (action.SequenceEqual("sync") || action.SequenceEqual("datasync") || action.SequenceEqual("trim") || action.SequenceEqual("wait"))
        {
            return ParseOutcome.Ignored;
        }
        else
        {
            return Malformed(ref io, $"unknown action '{action}'");
        }
        if (!TryNonNegative(s[t[first + 2]], out io.Offset) || !TryNonNegative(s[t[first + 3]], out io.Length))
        {
            return Malformed(ref io, "offset or length is not a non-negative integer");
        }
        io.Device = s[t[first]];
        return ParseOutcome.Io;
    }
}
