using System.Buffers;
using System.Runtime.InteropServices;

namespace QcowTier.Cli.Infrastructure;

/// <summary>Page-aligned native memory, so the same buffers serve O_DIRECT (cache=none) without bounce copies.</summary>
internal sealed unsafe class AlignedBuffer : MemoryManager<byte>
{
    private const int Alignment = 4096;
    private byte* _ptr;
    private readonly int _length;

    public AlignedBuffer(int length)
    {
        _length = length;
        _ptr = (byte*)NativeMemory.AlignedAlloc((nuint)Math.Max(length, 1), Alignment);
        NativeMemory.Clear(_ptr, (nuint)length);
    }

    public int Length => _length;

    public override Span<byte> GetSpan() => new(_ptr, _length);

    public override MemoryHandle Pin(int elementIndex = 0) => new(_ptr + elementIndex);

    public override void Unpin() { }

    protected override void Dispose(bool disposing)
    {
        if (_ptr != null)
        {
            NativeMemory.AlignedFree(_ptr);
            _ptr = null;
        }
    }
}
