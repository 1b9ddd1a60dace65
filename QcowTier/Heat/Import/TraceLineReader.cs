namespace QcowTier.Heat.Import;

/// <summary>
/// Reads lines into one fixed buffer. TextReader.ReadLine would allocate a string per line and, on a file
/// without newlines, grow without bound; here an over-long line is skipped (its start kept for quoting).
/// </summary>
internal sealed class TraceLineReader
{
    private const int QuoteChars = 256;

    private readonly TextReader _reader;
    private readonly char[] _buffer;
    private readonly int _maxLine;
    private readonly char[] _longStart = new char[QuoteChars];
    private int _start;
    private int _end;
    private bool _eof;

    public TraceLineReader(TextReader reader, int maxLine)
    {
        _reader = reader;
        _maxLine = Math.Max(maxLine, 16);
        _buffer = new char[Math.Max(_maxLine * 2, 1 << 16)];
    }

    /// <summary>The next line, without its end-of-line characters; valid until the next call.</summary>
    /// <param name="line">The line, or its first characters when too long.</param>
    /// <param name="tooLong">The line exceeded the limit and was skipped up to its end.</param>
    /// <returns>False at the end of the input.</returns>
    public bool TryRead(out ReadOnlySpan<char> line, out bool tooLong)
    {
        tooLong = false;
        var scanned = 0; // chars after _start already known to hold no newline
        while (true)
        {
            var nl = _buffer.AsSpan(_start + scanned, _end - _start - scanned).IndexOf('\n');
            if (nl >= 0)
            {
                var len = scanned + nl;
                line = TrimCr(_buffer.AsSpan(_start, len));
                _start += len + 1;
                return true;
            }
            scanned = _end - _start;
            if (scanned > _maxLine)
            {
                var keep = Math.Min(QuoteChars, scanned);
                _buffer.AsSpan(_start, keep).CopyTo(_longStart);
                SkipToNewline();
                line = _longStart.AsSpan(0, keep);
                tooLong = true;
                return true;
            }
            if (_eof)
            {
                if (scanned == 0)
                {
                    line = default;
                    return false;
                }
                line = TrimCr(_buffer.AsSpan(_start, scanned));
                _start = _end;
                return true;
            }
            Fill();
        }
    }

    private static ReadOnlySpan<char> TrimCr(ReadOnlySpan<char> s) => s.Length > 0 && s[^1] == '\r' ? s[..^1] : s;

    private void Fill()
    {
        if (_start > 0)
        {
            _buffer.AsSpan(_start, _end - _start).CopyTo(_buffer);
            _end -= _start;
            _start = 0;
        }
        var n = _reader.Read(_buffer, _end, _buffer.Length - _end);
        if (n <= 0)
        {
            _eof = true;
        }
        else
        {
            _end += n;
        }
    }

    private void SkipToNewline()
    {
        while (true)
        {
            var nl = _buffer.AsSpan(_start, _end - _start).IndexOf('\n');
            if (nl >= 0)
            {
                _start += nl + 1;
                return;
            }
            _start = _end = 0;
            if (_eof)
            {
                return;
            }
            Fill();
            if (_eof && _end == 0)
            {
                return;
            }
        }
    }
}

/// <summary>A read-only pass-through that counts the bytes taken, for progress reports.</summary>
internal sealed class CountingStream(Stream inner) : Stream
{
    private long _count;

    public long Count => Volatile.Read(ref _count);

    public override bool CanRead => true;
    public override bool CanSeek => false;
    public override bool CanWrite => false;
    public override long Length => throw new NotSupportedException();
    public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }

    public override int Read(byte[] buffer, int offset, int count) => Counted(inner.Read(buffer, offset, count));

    public override int Read(Span<byte> buffer) => Counted(inner.Read(buffer));

    public override void Flush() { }
    public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
    public override void SetLength(long value) => throw new NotSupportedException();
    public override void Write(byte[] buffer, int offset, int count) => throw new NotSupportedException();

    private int Counted(int n)
    {
        _count += Math.Max(n, 0);
        return n;
    }
}
