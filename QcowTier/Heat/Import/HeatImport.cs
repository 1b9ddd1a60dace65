using System.Text;
using QcowTier.Heat.Import;

namespace QcowTier;

/// <summary>
/// Builds heat from recorded I/O: QEMU trace logs, blkparse output, MSR Cambridge and Alibaba CSV traces,
/// fio iologs, and the persistent dirty bitmaps of a qcow2 image.
/// </summary>
/// <remarks>
/// Traces are streamed: memory stays bounded whatever their size (a fixed line buffer, and at most a few
/// private heat maps of the target's geometry). A line that cannot be parsed is counted, quoted in the
/// result and skipped; it never stops the import. Each I/O adds one operation to every unit it touches, at
/// the trace's own time when it has one. When a trace holds several devices, the busiest is imported
/// unless <see cref="HeatImportOptions.Device"/> names one. The target map is changed only when the whole
/// input has been read: a failed or cancelled import leaves it as it was.
/// </remarks>
public static class HeatImport
{
    /// <summary>Imports a text trace.</summary>
    /// <param name="reader">The trace.</param>
    /// <param name="format">Its format; <see cref="HeatTraceFormat.QemuDirtyBitmap"/> needs a stream.</param>
    /// <param name="target">The heat map to add the I/Os to; offsets are guest bytes of its disk.</param>
    /// <param name="options">Filters and time base; null for the defaults.</param>
    /// <param name="progress">Receives progress every 65536 lines and at the end.</param>
    /// <param name="cancellationToken">Stops the import; the target is then left unchanged.</param>
    /// <returns>What was read and imported.</returns>
    public static HeatImportResult Import(TextReader reader, HeatTraceFormat format, HeatMap target, HeatImportOptions? options = null, IProgress<HeatImportProgress>? progress = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(reader);
        ArgumentNullException.ThrowIfNull(target);
        if (format == HeatTraceFormat.QemuDirtyBitmap)
        {
            throw new ArgumentException("dirty bitmaps are read from the qcow2 image: pass a seekable stream", nameof(format));
        }
        return ImportText(reader, null, format, target, options ?? new HeatImportOptions(), progress, cancellationToken);
    }

    /// <summary>Imports a trace from a stream (UTF-8 text), or the dirty bitmaps of a qcow2 image (a seekable stream).</summary>
    /// <param name="stream">The trace, or the image; left open.</param>
    /// <param name="format">Its format.</param>
    /// <param name="target">The heat map to add the I/Os to.</param>
    /// <param name="options">Filters and time base; null for the defaults.</param>
    /// <param name="progress">Receives progress now and then and at the end.</param>
    /// <param name="cancellationToken">Stops the import; the target is then left unchanged.</param>
    /// <returns>What was read and imported.</returns>
    /// <exception cref="QcowFormatException">The image's bitmap structures are damaged or beyond QEMU's limits (dirty bitmaps only).</exception>
    public static HeatImportResult Import(Stream stream, HeatTraceFormat format, HeatMap target, HeatImportOptions? options = null, IProgress<HeatImportProgress>? progress = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(stream);
        ArgumentNullException.ThrowIfNull(target);
        options ??= new HeatImportOptions();
        if (format == HeatTraceFormat.QemuDirtyBitmap)
        {
            return DirtyBitmapImporter.Import(stream, (stream as FileStream)?.Name, target, options, progress, cancellationToken);
        }
        var counting = new CountingStream(stream);
        using var reader = new StreamReader(counting, new UTF8Encoding(false), detectEncodingFromByteOrderMarks: true, bufferSize: 1 << 16, leaveOpen: true);
        return ImportText(reader, counting, format, target, options, progress, cancellationToken);
    }

    /// <summary>Imports a trace file, or the dirty bitmaps of a qcow2 image file.</summary>
    /// <param name="path">The file; opened for reading, shared with writers (an image may be in use).</param>
    /// <param name="format">Its format.</param>
    /// <param name="target">The heat map to add the I/Os to.</param>
    /// <param name="options">Filters and time base; null for the defaults.</param>
    /// <param name="progress">Receives progress now and then and at the end.</param>
    /// <param name="cancellationToken">Stops the import; the target is then left unchanged.</param>
    /// <returns>What was read and imported.</returns>
    public static HeatImportResult ImportFile(string path, HeatTraceFormat format, HeatMap target, HeatImportOptions? options = null, IProgress<HeatImportProgress>? progress = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(path);
        using var fs = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite | FileShare.Delete, 1 << 16, FileOptions.SequentialScan);
        return Import(fs, format, target, options, progress, cancellationToken);
    }

    private static HeatImportResult ImportText(TextReader text, CountingStream? counting, HeatTraceFormat format, HeatMap target, HeatImportOptions options, IProgress<HeatImportProgress>? progress, CancellationToken cancellationToken)
    {
        if (options.MaxLineLength is < 16 or > 1 << 20)
        {
            throw new ArgumentOutOfRangeException(nameof(options), options.MaxLineLength, "MaxLineLength must be between 16 and 1048576");
        }
        if (format == HeatTraceFormat.FioIolog && options.FioTimestampUnit <= TimeSpan.Zero)
        {
            throw new ArgumentOutOfRangeException(nameof(options), options.FioTimestampUnit, "FioTimestampUnit must be positive");
        }
        cancellationToken.ThrowIfCancellationRequested();
        var parser = TraceParser.Create(format, options);
        var filtered = options.Device is not null || options.Host is not null;
        var session = new ImportSession(target, options, format, name => parser.Accepts(name), filtered);
        var lines = new TraceLineReader(text, options.MaxLineLength);
        long lineNo = 0;
        while (lines.TryRead(out var line, out var tooLong))
        {
            if (lineNo > 0 && (lineNo & 0xfff) == 0)
            {
                cancellationToken.ThrowIfCancellationRequested();
                if ((lineNo & 0xffff) == 0)
                {
                    progress?.Report(new HeatImportProgress(lineNo, session.IosSeen, counting?.Count ?? 0));
                }
            }
            lineNo++;
            if (tooLong)
            {
                session.OnMalformed(lineNo, line, $"longer than {options.MaxLineLength} characters");
                continue;
            }
            var io = default(TraceIo);
            switch (parser.Parse(line, ref io))
            {
                case ParseOutcome.Io:
                    session.OnIo(io.Write, io.Offset, io.Length, io.TimeKind, io.Ticks, io.Device);
                    break;
                case ParseOutcome.Ignored:
                    session.LinesIgnored++;
                    break;
                default:
                    session.OnMalformed(lineNo, line, io.Reason ?? "malformed");
                    break;
            }
        }
        foreach (var w in parser.Warnings)
        {
            session.AddWarning(w);
        }
        var result = session.Finish(lineNo);
        progress?.Report(new HeatImportProgress(lineNo, session.IosSeen, counting?.Count ?? 0));
        return result;
    }
}
